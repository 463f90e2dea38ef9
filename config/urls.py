from django.contrib import admin
from django.urls import include, path
from django.views.generic import TemplateView

from callops import views

urlpatterns = [
    # A page that leads on: the admin, the API docs, the health checks.
    path("", TemplateView.as_view(template_name="callops/home.html"), name="home"),
    path("webhooks/telnyx/", views.telnyx_webhook, name="telnyx-webhook"),
    path("api/v1/", include(("callops.api.urls", "api"), namespace="api")),
    path("admin/console/", include("callops.console")),
    path("admin/", admin.site.urls),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.prometheus_metrics, name="metrics"),
]

handler404 = "callops.views.not_found"
