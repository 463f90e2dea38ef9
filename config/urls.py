from django.contrib import admin
from django.urls import include, path

from callops import views

urlpatterns = [
    path("webhooks/telnyx/", views.telnyx_webhook, name="telnyx-webhook"),
    path("api/v1/", include(("callops.api.urls", "api"), namespace="api")),
    path("admin/", admin.site.urls),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
]

handler404 = "callops.views.not_found"
