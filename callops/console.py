"""The operators' console pages beyond the model admin: the dashboard and a call's timeline.

Both are admin pages (``admin.site.admin_view``: staff only, logged in), each section and page
behind the view permission of what it shows. The figures come from ``callops.dashboard``, the
timeline from ``callops.timeline``; these views only render them.
"""

from __future__ import annotations

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils.http import urlencode

from callops import dashboard, timeline
from callops.models import Call

TIMELINE_PAGE = 200
# Who may view a call sees its sessions, digits and segments (the call's page shows them);
# its events, commands and deliveries need their own view permission.
SOURCE_PERMISSIONS = {
    "event": "callops.view_webhookevent",
    "command": "callops.view_command",
    "delivery": "callops.view_delivery",
}


def dashboard_view(request: HttpRequest) -> HttpResponse:
    figures = dashboard.dashboard_figures(user=request.user)
    context = {
        **admin.site.each_context(request),
        "title": "Dashboard",
        "figures": figures,
        "window_minutes": int(dashboard.WINDOW.total_seconds() // 60),
    }
    return TemplateResponse(request, "admin/callops/dashboard.html", context)


def _admin_url(entry: timeline.Entry) -> str | None:
    try:
        return reverse(f"admin:callops_{entry.model}_change", args=[entry.record_pk])
    except NoReverseMatch:  # a model without an admin page of its own
        return None


def timeline_view(request: HttpRequest, pk: int) -> HttpResponse:
    if not request.user.has_perm("callops.view_call"):
        raise PermissionDenied
    call = get_object_or_404(Call, pk=pk)
    try:
        page = timeline.call_timeline(
            call=call,
            cursor=request.GET.get("cursor") or None,
            limit=TIMELINE_PAGE,
            sources=frozenset(
                name
                for name in timeline.SOURCE_NAMES
                if request.user.has_perm(SOURCE_PERMISSIONS.get(name, "callops.view_call"))
            ),
        )
    except timeline.CursorInvalid as exc:
        return HttpResponseBadRequest(f"cursor: {exc}")
    rows = [(timeline.format_ms(entry.at), entry, _admin_url(entry)) for entry in page.entries]
    context = {
        **admin.site.each_context(request),
        "title": f"Timeline of {call.call_control_id}",
        "call": call,
        "opts": Call._meta,
        "rows": rows,
        "next_url": f"?{urlencode({'cursor': page.next_cursor})}" if page.next_cursor else None,
        "first_page": not request.GET.get("cursor"),
    }
    return TemplateResponse(request, "admin/callops/call/timeline.html", context)


app_name = "console"
urlpatterns = [
    path("dashboard/", admin.site.admin_view(dashboard_view), name="dashboard"),
    path("calls/<int:pk>/timeline/", admin.site.admin_view(timeline_view), name="call-timeline"),
]
