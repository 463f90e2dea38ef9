"""The partner REST API. Thin views: look the call up among the partner's own, validate, call a
service, answer. Another partner's call is a 404, exactly like a call that does not exist."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from django import forms
from django.db.models import Prefetch
from django_filters import rest_framework as filters
from django_filters.fields import IsoDateTimeField
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import generics, mixins, renderers, status, viewsets
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response
from rest_framework.views import APIView

from callops import actions, commands
from callops.api import schema  # noqa: F401  (registers the auth scheme and throttle)
from callops.api import serializers as s
from callops.api.idempotency import idempotent
from callops.models import Call, Command, StreamingProfile, TranscriptSegment
from callops.telnyx_params import ParamsInvalid

ERRORS = {
    code: OpenApiResponse(s.ErrorSerializer, description=text)
    for code, text in (
        (400, "Invalid request: each error names its field"),
        (401, "Missing, unknown or revoked API key"),
        (403, "Inactive partner"),
        (404, "No such call (or not yours)"),
        (429, "Too many requests; see Retry-After"),
        (503, "The database or the rate limit's cache is down; retry after Retry-After"),
    )
}
# What any request with a body may also answer (DRF's parsers: JSON only).
UNSUPPORTED = {
    415: OpenApiResponse(
        s.ErrorSerializer, description="The body is not JSON: send Content-Type: application/json"
    )
}
IDEMPOTENCY = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="Replays the first answer to the same key within 24 h; 422 if the body differs.",
)


def partner_call(request, call_control_id: str) -> Call:
    # No call id holds a NUL, and PostgreSQL refuses one in a query (a 500, not a 404).
    call = (
        request.user.calls().filter(call_control_id=call_control_id).first()
        if "\x00" not in call_control_id
        else None
    )
    if call is None:
        raise NotFound("No such call.")
    return call


class UTCDateTimeField(IsoDateTimeField):
    """ISO 8601, normalised to UTC: PostgreSQL refuses offsets Python accepts (e.g. -19:03)."""

    def to_python(self, value):
        parsed = super().to_python(value)
        if parsed is None:
            return None
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            raise forms.ValidationError("is out of range") from None


class UTCDateTimeFilter(filters.IsoDateTimeFilter):
    field_class = UTCDateTimeField


class CallFilter(filters.FilterSet):
    status = filters.ChoiceFilter(choices=Call.Status.choices)
    connection = filters.CharFilter(field_name="connection_id")
    started_after = UTCDateTimeFilter(field_name="started_at", lookup_expr="gte")
    started_before = UTCDateTimeFilter(field_name="started_at", lookup_expr="lt")

    class Meta:
        model = Call
        fields = ["status", "connection", "started_after", "started_before"]


class CallPagination(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200

    def decode_cursor(self, request):
        """DRF checks a cursor's offset and direction, but puts its position straight into the
        query, so a tampered position was a 500 (or a database error). The position must be
        the UTC ``created_at`` DRF itself wrote; any bad cursor is a 400 naming it."""
        try:
            cursor = super().decode_cursor(request)
            valid = cursor is None or _is_utc_timestamp(cursor.position)
        except NotFound:
            valid = False
        if not valid:
            raise ValidationError({"cursor": [self.invalid_cursor_message]})
        return cursor


def _is_utc_timestamp(position: str | None) -> bool:
    if position is None:  # the first page, or a cursor without one: nothing goes into the query
        return True
    try:
        return datetime.fromisoformat(position).utcoffset() == timedelta(0)
    except (TypeError, ValueError):
        return False


@extend_schema_view(
    get=extend_schema(tags=["calls"], responses={200: s.CallSerializer(many=True), **ERRORS}),
    post=extend_schema(
        tags=["commands"],
        summary="Dial an outbound call",
        request=s.DialInput,
        parameters=[IDEMPOTENCY],
        responses={
            202: s.CommandSerializer,
            422: OpenApiResponse(s.ErrorSerializer, description="Idempotency-Key reused"),
            **ERRORS,
            **UNSUPPORTED,
        },
    ),
)
class CallList(generics.ListAPIView):
    """Your calls, newest first; POST dials a new one on one of your connections."""

    serializer_class = s.CallSerializer
    pagination_class = CallPagination
    filter_backends = [filters.DjangoFilterBackend]
    filterset_class = CallFilter

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation: no partner
            return Call.objects.none()
        return self.request.user.calls()

    @idempotent
    def post(self, request):
        body = s.DialInput(data=request.data, context={"partner": request.user})
        body.is_valid(raise_exception=True)
        try:
            command = commands.call_dial(
                requested_by=Command.RequestedBy.PARTNER, **body.validated_data
            )
        except ParamsInvalid as exc:
            return Response(
                {"errors": [{"field": f, "message": " ".join(m)} for f, m in exc.errors.items()]},
                status=400,
            )
        return Response(s.CommandSerializer(command).data, status=status.HTTP_202_ACCEPTED)


@extend_schema(tags=["calls"], responses={200: s.CallDetailSerializer, **ERRORS})
class CallDetail(APIView):
    """One call with its streams, forks, transcriptions and commands."""

    def get(self, request, call_control_id: str):
        call = partner_call(request, call_control_id)
        call = Call.objects.prefetch_related(
            "streams",
            "forks",
            "transcriptions",
            Prefetch("commands", queryset=Command.objects.order_by("-created_at")),
        ).get(pk=call.pk)
        return Response(s.CallDetailSerializer(call).data)


class PlainTextRenderer(renderers.BaseRenderer):
    """The transcript as text: one line per segment, ``[time] track: words``."""

    media_type = "text/plain"
    format = "txt"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None) -> bytes:
        if isinstance(data, dict) and "errors" in data:
            errors = data["errors"]
            return "\n".join(
                f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors
            ).encode()
        segments = data["results"] if isinstance(data, dict) else data
        lines = [
            f"[{seg['occurred_at']}] {seg['track'] or '-'}: {seg['transcript']}" for seg in segments
        ]
        return ("\n".join(lines) + ("\n" if lines else "")).encode()


class TranscriptPagination(CallPagination):
    """In time order. The next page's address is also in a ``Link`` header, so the text form
    (which has no envelope) can be paged too."""

    ordering = ("occurred_at", "id")
    page_size = 200
    max_page_size = 1000

    def get_paginated_response(self, data):
        response = super().get_paginated_response(data)
        if next_url := self.get_next_link():
            response["Link"] = f'<{next_url}>; rel="next"'
        return response


FINAL_ONLY = {"true": True, "1": True, "false": False, "0": False}


@extend_schema(
    tags=["calls"],
    parameters=[
        OpenApiParameter(
            "final_only",
            OpenApiTypes.BOOL,
            description="Final segments only; default false for JSON, true for text",
        )
    ],
    responses={200: s.TranscriptSegmentSerializer(many=True), **ERRORS},
)
class CallTranscript(generics.ListAPIView):
    """The call's transcript in time order, cursor-paginated; ``?format=txt`` (or ``Accept:
    text/plain``) for text, which shows final segments only unless ``final_only=false``."""

    renderer_classes = [renderers.JSONRenderer, PlainTextRenderer]
    serializer_class = s.TranscriptSegmentSerializer
    pagination_class = TranscriptPagination

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return TranscriptSegment.objects.none()
        call = partner_call(self.request, self.kwargs["call_control_id"])
        segments = TranscriptSegment.objects.filter(call=call)
        given = self.request.query_params.get("final_only", "").lower()
        if given and given not in FINAL_ONLY:
            raise ValidationError({"final_only": ["must be true or false"]})
        # Text is for reading: interim guesses repeat the final words, so they stay out of it
        # unless asked for. JSON keeps every segment by default, as it always did.
        final_only = FINAL_ONLY.get(given, self.request.accepted_renderer.format == "txt")
        return segments.filter(is_final=True) if final_only else segments


class CallCommand(APIView):
    """Base of the six command endpoints; subclasses name the action and the body."""

    input_class: type[s.CommandInput]

    @idempotent
    def post(self, request, call_control_id: str):
        call = partner_call(request, call_control_id)
        profile = StreamingProfile.for_call(call)
        body = self.input_class(data=request.data, context={"profile": profile})
        body.is_valid(raise_exception=True)
        try:
            command = commands.command_create(
                call=call,
                action=self.input_class.action,
                requested_by=Command.RequestedBy.PARTNER,
                **body.validated_data,
            )
        except (commands.CallEnded, commands.CommandConflict) as exc:
            return Response({"errors": [{"field": None, "message": str(exc)}]}, status=409)
        except ParamsInvalid as exc:
            return Response(
                {"errors": [{"field": f, "message": " ".join(m)} for f, m in exc.errors.items()]},
                status=400,
            )
        return Response(s.CommandSerializer(command).data, status=status.HTTP_202_ACCEPTED)


def command_view(name: str, input_class: type[s.CommandInput], summary: str) -> type[CallCommand]:
    view = type(name, (CallCommand,), {"input_class": input_class, "__doc__": summary})
    return extend_schema(
        tags=["commands"],
        summary=summary,
        request=input_class,
        parameters=[IDEMPOTENCY],
        responses={
            202: s.CommandSerializer,
            409: OpenApiResponse(
                s.ErrorSerializer, description="The call has ended, or this stop is in flight"
            ),
            422: OpenApiResponse(s.ErrorSerializer, description="Idempotency-Key reused"),
            **ERRORS,
            **UNSUPPORTED,
        },
    )(view)


# One endpoint per action the table gives a path: POST /calls/{id}/<api_path>.
COMMAND_VIEWS = {
    name: command_view(
        input_class.__name__.removesuffix("Input"), input_class, actions.get(name).summary
    )
    for name, input_class in s.COMMAND_INPUTS.items()
}


@extend_schema(tags=["commands"], responses={200: s.CommandSerializer, **ERRORS})
class CommandDetail(APIView):
    """A command's progress."""

    def get(self, request, command_id: str):
        command = (
            Command.objects.select_related("call")
            .filter(call__in=request.user.calls(), command_id=_uuid_or_none(command_id))
            .first()
        )
        if command is None:
            raise NotFound("No such command.")
        return Response(s.CommandSerializer(command).data)


def _uuid_or_none(value: str):
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


@extend_schema(tags=["profiles"])
@extend_schema_view(
    list=extend_schema(responses={200: s.StreamingProfileSerializer(many=True), **ERRORS}),
    retrieve=extend_schema(responses={200: s.StreamingProfileSerializer, **ERRORS}),
    create=extend_schema(responses={201: s.StreamingProfileSerializer, **ERRORS, **UNSUPPORTED}),
    partial_update=extend_schema(
        responses={200: s.StreamingProfileSerializer, **ERRORS, **UNSUPPORTED}
    ),
    destroy=extend_schema(responses={204: None, **ERRORS}),
)
class StreamingProfileViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Your streaming profiles: how your calls are streamed, and whether to start on answer."""

    serializer_class = s.StreamingProfileSerializer
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return StreamingProfile.objects.none()
        return StreamingProfile.objects.filter(partner=self.request.user).order_by("pk")

    def get_serializer_context(self):
        return {**super().get_serializer_context(), "partner": self.request.user}

    def perform_create(self, serializer):
        serializer.save(partner=self.request.user)

    @extend_schema(
        parameters=[IDEMPOTENCY],
        responses={
            201: s.StreamingProfileSerializer,
            422: OpenApiResponse(s.ErrorSerializer, description="Idempotency-Key reused"),
            **ERRORS,
            **UNSUPPORTED,
        },
    )
    @idempotent
    def create(self, request, *args, **kwargs):
        return super().create(request, *args, **kwargs)
