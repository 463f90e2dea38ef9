from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from callops.api import views

router = SimpleRouter(trailing_slash=True)
router.register("profiles", views.StreamingProfileViewSet, basename="profile")

CALL = "calls/<str:call_control_id>"
urlpatterns = [
    path("calls/", views.CallList.as_view(), name="call-list"),
    path(f"{CALL}/", views.CallDetail.as_view(), name="call-detail"),
    path(f"{CALL}/transcript/", views.CallTranscript.as_view(), name="call-transcript"),
    path(f"{CALL}/streaming/", views.StreamingStart.as_view(), name="streaming-start"),
    path(f"{CALL}/streaming/stop/", views.StreamingStop.as_view(), name="streaming-stop"),
    path(f"{CALL}/forking/", views.ForkingStart.as_view(), name="forking-start"),
    path(f"{CALL}/forking/stop/", views.ForkingStop.as_view(), name="forking-stop"),
    path(f"{CALL}/transcription/", views.TranscriptionStart.as_view(), name="transcription-start"),
    path(
        f"{CALL}/transcription/stop/", views.TranscriptionStop.as_view(), name="transcription-stop"
    ),
    path("commands/<str:command_id>/", views.CommandDetail.as_view(), name="command-detail"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    *router.urls,
]
