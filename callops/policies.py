"""What callops does on its own when a call changes: the partners' standing instructions."""

from __future__ import annotations

import logging

from django.utils import timezone

from callops import commands
from callops.models import Call, Command, StreamingProfile
from callops.telnyx_params import ParamsInvalid

logger = logging.getLogger("callops.policies")


def call_answered_policy(*, call: Call) -> list[Command]:
    """Start streaming (and transcription, if asked) on an answered call whose connection has an
    auto-start profile. Once per call: the caller holds the call's row lock, and
    ``autostarted_at`` is set in the same transaction, however often call.answered arrives."""
    if call.autostarted_at is not None or call.is_ended:
        return []
    profile = StreamingProfile.for_call(call)
    if profile is None or not profile.auto_start:
        return []
    call.autostarted_at = timezone.now()
    wanted = [(Command.Action.STREAMING_START, profile.streaming_params())]
    if profile.transcribe:
        wanted.append((Command.Action.TRANSCRIPTION_START, profile.transcription_params()))
    created = []
    for action, params in wanted:
        try:
            created.append(
                commands.command_create(
                    call=call, action=action, params=params, requested_by=Command.RequestedBy.POLICY
                )
            )
        except (commands.CallEnded, ParamsInvalid) as exc:
            logger.warning("auto-start %s on %s not sent: %s", action, call.call_control_id, exc)
    return created
