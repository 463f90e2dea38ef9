from django.contrib import admin
from django.urls import path

from callops import views

urlpatterns = [
    path("webhooks/telnyx/", views.telnyx_webhook, name="telnyx-webhook"),
    path("admin/", admin.site.urls),
]
