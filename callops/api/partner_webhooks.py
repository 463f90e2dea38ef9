"""The partner API's webhook endpoints and deliveries: where a partner's events go, and how each
delivery went. Scoped to the partner like every other resource: another partner's endpoint or
delivery is a 404. A secret is shown on create and on rotation only."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from callops import partner_delivery, partner_events
from callops.api.idempotency import idempotent
from callops.api.serializers import ErrorSerializer
from callops.api.views import ERRORS, IDEMPOTENCY, CallPagination
from callops.models import Delivery, WebhookEndpoint
from callops.targets import UnsafeTarget


def posted(request, responses: dict):
    """The schema of a POST: its body, the Idempotency-Key and what it may answer."""
    reused = OpenApiResponse(ErrorSerializer, description="Idempotency-Key reused")
    return extend_schema(
        request=request, parameters=[IDEMPOTENCY], responses={**responses, 422: reused}
    )


NOT_FOUND = {
    **ERRORS,
    404: OpenApiResponse(ErrorSerializer, description="No such one (or not yours)"),
}


class WebhookEndpointSerializer(serializers.ModelSerializer):
    event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=partner_events.EVENT_TYPES),
        required=False,
        help_text="Event types to send; empty or omitted: every type.",
    )
    secret_rotating_until = serializers.DateTimeField(
        source="previous_expires_at", read_only=True, allow_null=True
    )

    class Meta:
        model = WebhookEndpoint
        fields = [
            "id",
            "url",
            "description",
            "event_types",
            "include_interim",
            "active",
            "secret_rotating_until",
            "created_at",
        ]
        read_only_fields = ["id", "created_at"]

    def validate_url(self, url: str) -> str:
        try:
            partner_delivery.check_webhook_url(url)
        except UnsafeTarget as exc:
            raise serializers.ValidationError(str(exc)) from None
        return url

    def validate_event_types(self, event_types: list[str]) -> list[str]:
        return list(dict.fromkeys(event_types))  # in the order given, once each


class WebhookEndpointWithSecretSerializer(WebhookEndpointSerializer):
    """The answer to a create or a rotation: the only time the secret is shown."""

    secret = serializers.CharField(read_only=True, help_text="whsec_...; shown only now")

    class Meta(WebhookEndpointSerializer.Meta):
        fields = [*WebhookEndpointSerializer.Meta.fields, "secret"]


class RotateSecretInput(serializers.Serializer):
    overlap_seconds = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=7 * 24 * 3600,
        help_text="How long the old secret keeps signing too (default"
        " CALLOPS_WEBHOOK_SECRET_OVERLAP); 0 retires it at once.",
    )


class DeliverySerializer(serializers.ModelSerializer):
    event_id = serializers.CharField(source="event.event_id", read_only=True)
    event_type = serializers.CharField(source="event.type", read_only=True)
    call_control_id = serializers.SerializerMethodField()

    class Meta:
        model = Delivery
        fields = [
            "id",
            "endpoint",
            "event_id",
            "event_type",
            "call_control_id",
            "sequence",
            "status",
            "attempts",
            "next_attempt_at",
            "last_status_code",
            "last_error",
            "last_attempt_at",
            "delivered_at",
            "created_at",
        ]
        read_only_fields = fields

    def get_call_control_id(self, delivery: Delivery) -> str | None:
        return delivery.event.payload.get("call_control_id")


@extend_schema(tags=["webhooks"])
@extend_schema_view(
    list=extend_schema(responses={200: WebhookEndpointSerializer(many=True), **ERRORS}),
    retrieve=extend_schema(responses={200: WebhookEndpointSerializer, **NOT_FOUND}),
    partial_update=extend_schema(responses={200: WebhookEndpointSerializer, **NOT_FOUND}),
    destroy=extend_schema(responses={204: None, **NOT_FOUND}),
)
class WebhookEndpointViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Your webhook endpoints: the URLs your calls' events are POSTed to, signed."""

    serializer_class = WebhookEndpointSerializer
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return WebhookEndpoint.objects.none()
        return WebhookEndpoint.objects.filter(partner=self.request.user).order_by("pk")

    @posted(WebhookEndpointSerializer, {201: WebhookEndpointWithSecretSerializer, **ERRORS})
    @idempotent
    def create(self, request, *args, **kwargs):
        body = WebhookEndpointSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        endpoint = partner_delivery.webhook_endpoint_create(
            partner=request.user, **body.validated_data
        )
        return Response(
            WebhookEndpointWithSecretSerializer(endpoint).data, status=status.HTTP_201_CREATED
        )

    @posted(RotateSecretInput, {200: WebhookEndpointWithSecretSerializer, **NOT_FOUND})
    @action(detail=True, methods=["post"], url_path="rotate-secret")
    @idempotent
    def rotate_secret(self, request, pk=None):
        """A new secret; the old one signs too (a second signature) for ``overlap_seconds``."""
        endpoint = self.get_object()
        body = RotateSecretInput(data=request.data)
        body.is_valid(raise_exception=True)
        endpoint = partner_delivery.webhook_endpoint_rotate_secret(
            endpoint=endpoint, overlap_seconds=body.validated_data.get("overlap_seconds")
        )
        return Response(WebhookEndpointWithSecretSerializer(endpoint).data)


class DeliveryPagination(CallPagination):
    """Newest first by ``created_at``, whose cursor is checked as the calls' is (a 400)."""


@extend_schema(tags=["webhooks"])
@extend_schema_view(
    list=extend_schema(responses={200: DeliverySerializer(many=True), **ERRORS}),
    retrieve=extend_schema(responses={200: DeliverySerializer, **NOT_FOUND}),
)
class DeliveryViewSet(viewsets.ReadOnlyModelViewSet):
    """Deliveries of your events to your endpoints, newest first."""

    serializer_class = DeliverySerializer
    pagination_class = DeliveryPagination

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Delivery.objects.none()
        return Delivery.objects.select_related("event").filter(endpoint__partner=self.request.user)

    @posted(
        None,
        {
            202: DeliverySerializer,
            409: OpenApiResponse(ErrorSerializer, description="It is being sent right now"),
            **NOT_FOUND,
        },
    )
    @action(detail=True, methods=["post"])
    @idempotent
    def redeliver(self, request, pk=None):
        """Send it again, with a fresh window of attempts (same event id: dedupe by it)."""
        delivery = self.get_object()
        if not partner_delivery.delivery_redeliver(delivery=delivery):
            return Response(
                {"errors": [{"field": None, "message": "it is being sent right now"}]},
                status=409,
            )
        delivery.refresh_from_db()
        return Response(DeliverySerializer(delivery).data, status=status.HTTP_202_ACCEPTED)
