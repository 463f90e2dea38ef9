from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from callops import actions
from callops.api import partner_webhooks, timeline, views

router = SimpleRouter(trailing_slash=True)
router.register("profiles", views.StreamingProfileViewSet, basename="profile")
router.register(
    "webhook-endpoints", partner_webhooks.WebhookEndpointViewSet, basename="webhook-endpoint"
)
router.register("deliveries", partner_webhooks.DeliveryViewSet, basename="delivery")
router.register("events", partner_webhooks.PartnerEventViewSet, basename="event")

CALL = "calls/<str:call_control_id>"

urlpatterns = [
    path("calls/", views.CallList.as_view(), name="call-list"),
    path(f"{CALL}/", views.CallDetail.as_view(), name="call-detail"),
    path(f"{CALL}/transcript/", views.CallTranscript.as_view(), name="call-transcript"),
    path(f"{CALL}/timeline/", timeline.CallTimeline.as_view(), name="call-timeline"),
    *(
        path(f"{CALL}/{actions.get(name).api_path}", view.as_view(), name=name.replace("_", "-"))
        for name, view in views.COMMAND_VIEWS.items()
    ),
    path("commands/<str:command_id>/", views.CommandDetail.as_view(), name="command-detail"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    *router.urls,
]
