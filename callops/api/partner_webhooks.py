"""The partner API's webhook endpoints, events and deliveries: where a partner's events go, what
they were, and how each delivery went; an event can be replayed. Scoped to the partner like every
other resource: another partner's endpoint, event or delivery is a 404. A secret is shown on
create and on rotation only."""

from __future__ import annotations

from django import forms
from django_filters import rest_framework as filters
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from callops import partner_delivery, partner_events
from callops.api.idempotency import idempotent
from callops.api.serializers import ErrorSerializer
from callops.api.views import (
    ERRORS,
    IDEMPOTENCY,
    UNSUPPORTED,
    CallPagination,
    UTCDateTimeFilter,
)
from callops.models import Delivery, PartnerEvent, WebhookEndpoint
from callops.targets import UnsafeTarget


def posted(request, responses: dict):
    """The schema of a POST: its body, the Idempotency-Key and what it may answer."""
    reused = OpenApiResponse(ErrorSerializer, description="Idempotency-Key reused")
    return extend_schema(
        request=request,
        parameters=[IDEMPOTENCY],
        responses={**responses, 422: reused, **UNSUPPORTED},
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
    partial_update=extend_schema(
        responses={200: WebhookEndpointSerializer, **NOT_FOUND, **UNSUPPORTED}
    ),
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


@extend_schema(tags=["webhooks"])
@extend_schema_view(
    list=extend_schema(responses={200: DeliverySerializer(many=True), **ERRORS}),
    retrieve=extend_schema(responses={200: DeliverySerializer, **NOT_FOUND}),
)
class DeliveryViewSet(viewsets.ReadOnlyModelViewSet):
    """Deliveries of your events to your endpoints, newest first."""

    serializer_class = DeliverySerializer
    pagination_class = CallPagination  # newest first by created_at, cursor checked

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


# --- Events: list and replay ------------------------------------------------------------------


class PlainTextField(forms.CharField):
    """Text PostgreSQL can compare: a NUL is refused here (a 400), not by the database (a 500)."""

    def validate(self, value) -> None:
        super().validate(value)
        if value and "\x00" in value:
            raise forms.ValidationError("must not contain NUL characters")


class PlainTextFilter(filters.CharFilter):
    field_class = PlainTextField


class SequenceFilter(filters.NumberFilter):
    """A whole number in the column's range (a decimal or a huge number is a 400)."""

    field_class = forms.IntegerField


class PartnerEventFilter(filters.FilterSet):
    call = PlainTextFilter(
        field_name="call__call_control_id", max_length=255, help_text="A call_control_id."
    )
    type = filters.ChoiceFilter(choices=[(t, t) for t in partner_events.EVENT_TYPES])
    since = UTCDateTimeFilter(
        field_name="created_at", lookup_expr="gte", help_text="Created at or after (ISO 8601)."
    )
    after_sequence = SequenceFilter(
        field_name="sequence",
        lookup_expr="gt",
        min_value=0,
        max_value=2**31 - 1,
        help_text="Only events numbered above this in their call (with call=).",
    )

    class Meta:
        model = PartnerEvent
        fields = ["call", "type", "since", "after_sequence"]


class PartnerEventSerializer(serializers.ModelSerializer):
    id = serializers.CharField(source="event_id", read_only=True)
    call_control_id = serializers.SerializerMethodField()
    payload = serializers.JSONField(read_only=True, help_text="The body each endpoint gets.")

    class Meta:
        model = PartnerEvent
        fields = [
            "id",
            "type",
            "call_control_id",
            "sequence",
            "occurred_at",
            "created_at",
            "payload",
        ]
        read_only_fields = fields

    def get_call_control_id(self, event: PartnerEvent) -> str | None:
        return event.payload.get("call_control_id")


class ReplayInput(serializers.Serializer):
    endpoint = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=2**63 - 1,
        help_text="One of your active endpoints; omitted: every active endpoint that subscribes"
        " to the event's type.",
    )

    def validate_endpoint(self, pk: int) -> WebhookEndpoint:
        endpoint = self.context["partner"].webhook_endpoints.filter(pk=pk, active=True).first()
        if endpoint is None:
            raise serializers.ValidationError("no such active endpoint of yours")
        return endpoint


@extend_schema(tags=["webhooks"])
@extend_schema_view(
    list=extend_schema(responses={200: PartnerEventSerializer(many=True), **ERRORS}),
    retrieve=extend_schema(responses={200: PartnerEventSerializer, **NOT_FOUND}),
)
class PartnerEventViewSet(viewsets.ReadOnlyModelViewSet):
    """Events of your calls, newest first: what each endpoint was sent (or will be)."""

    serializer_class = PartnerEventSerializer
    pagination_class = CallPagination  # newest first by created_at, cursor checked
    filter_backends = [filters.DjangoFilterBackend]
    filterset_class = PartnerEventFilter
    lookup_field = "event_id"
    lookup_url_kwarg = "id"
    lookup_value_regex = "evt_[0-9a-f]{32}"

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return PartnerEvent.objects.none()
        return PartnerEvent.objects.filter(partner=self.request.user)

    @posted(
        ReplayInput,
        {
            202: DeliverySerializer(many=True),
            409: OpenApiResponse(ErrorSerializer, description="No active endpoint wants it"),
            **NOT_FOUND,
        },
    )
    @action(detail=True, methods=["post"])
    @idempotent
    def replay(self, request, id=None):
        """Send the event again (same id and body: dedupe by it) to the endpoint named, or to
        every active endpoint that subscribes to its type now."""
        event = self.get_object()
        body = ReplayInput(data=request.data, context={"partner": request.user})
        body.is_valid(raise_exception=True)
        chosen = body.validated_data.get("endpoint")
        endpoints = [chosen] if chosen else partner_delivery.endpoints_subscribed(event=event)
        if not endpoints:
            message = "no active endpoint of yours subscribes to this event's type"
            return Response({"errors": [{"field": None, "message": message}]}, status=409)
        deliveries = partner_delivery.partner_event_replay(event=event, endpoints=endpoints)
        for delivery in deliveries:
            delivery.event = event
        return Response(
            DeliverySerializer(deliveries, many=True).data, status=status.HTTP_202_ACCEPTED
        )
