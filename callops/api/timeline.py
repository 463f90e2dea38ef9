"""``GET /calls/{id}/timeline/``: the call's timeline (``callops.timeline``), a page at a time."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.utils.urls import replace_query_param
from rest_framework.views import APIView

from callops import timeline
from callops.api.views import ERRORS, partner_call

PAGE_SIZE, MAX_PAGE_SIZE = 100, 500


class TimelineEntrySerializer(serializers.Serializer):
    at = serializers.DateTimeField(help_text="UTC, to the millisecond")
    source = serializers.ChoiceField(choices=timeline.SOURCE_NAMES)
    kind = serializers.CharField(help_text="e.g. call.answered, command.sent, stream.started")
    summary = serializers.CharField()
    id = serializers.CharField(help_text="The record's id: a Telnyx event id, a command id, ...")
    url = serializers.CharField(allow_null=True, help_text="The record in this API, if it has one")

    def to_representation(self, entry: timeline.Entry) -> dict:
        request = self.context["request"]
        url = None
        if entry.model == "command":
            url = reverse("api:command-detail", args=[entry.public_id], request=request)
        elif entry.model == "delivery":
            url = reverse("api:delivery-detail", args=[entry.public_id], request=request)
        return {
            "at": entry.at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "source": entry.source,
            "kind": entry.kind,
            "summary": entry.summary,
            "id": entry.public_id or str(entry.record_pk),
            "url": url,
        }


class TimelinePageSerializer(serializers.Serializer):
    next = serializers.URLField(allow_null=True)
    results = TimelineEntrySerializer(many=True)


def _page_size(request) -> int:
    given = request.query_params.get("page_size")
    if given is None:
        return PAGE_SIZE
    if not given.isascii() or not given.isdigit() or not 1 <= int(given) <= MAX_PAGE_SIZE:
        raise ValidationError({"page_size": [f"must be a whole number from 1 to {MAX_PAGE_SIZE}"]})
    return int(given)


@extend_schema(
    tags=["calls"],
    parameters=[
        OpenApiParameter("cursor", OpenApiTypes.STR, description="From the previous page's next"),
        OpenApiParameter(
            "page_size", OpenApiTypes.INT, description=f"1 to {MAX_PAGE_SIZE}, default {PAGE_SIZE}"
        ),
    ],
    responses={200: TimelinePageSerializer, **ERRORS},
)
class CallTimeline(APIView):
    """What happened on the call, in time order to the millisecond: Telnyx's webhooks, your
    and callops' commands (created, sent, finished), DTMF, streams, forks and transcriptions,
    final transcript segments and deliveries to your endpoints."""

    def get(self, request, call_control_id: str):
        call = partner_call(request, call_control_id)
        limit = _page_size(request)
        try:
            page = timeline.call_timeline(
                call=call,
                cursor=request.query_params.get("cursor") or None,
                limit=limit,
                partner=request.user,
            )
        except timeline.CursorInvalid as exc:
            raise ValidationError({"cursor": [str(exc)]}) from None
        next_url = None
        if page.next_cursor:
            next_url = replace_query_param(request.build_absolute_uri(), "cursor", page.next_cursor)
        entries = TimelineEntrySerializer(page.entries, many=True, context={"request": request})
        return Response({"next": next_url, "results": entries.data})
