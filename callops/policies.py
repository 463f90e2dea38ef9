"""What callops does on its own when a call changes: the partners' standing instructions.

Each runs while the caller holds the call's row lock and records that it ran on the call in
the same transaction, so it acts once per call however often Telnyx delivers the event.
"""

from __future__ import annotations

import logging

from django.utils import timezone

from callops import commands
from callops.models import Call, Command, StreamingProfile
from callops.telnyx_params import ParamsInvalid

logger = logging.getLogger("callops.policies")


def call_initiated_policy(*, call: Call) -> list[Command]:
    """An incoming call waits, parked, until its Call Control app answers it (TELNYX.md
    section 5). The profile's answer policy says what callops does: answer it, with the
    profile's streaming and transcription inline in that one command; reject it; or nothing
    (another application answers, and ``call_answered_policy`` may start media then)."""
    if call.answer_decided_at is not None or call.is_ended or call.direction != "incoming":
        return []
    profile = StreamingProfile.for_call(call)
    if profile is None or profile.answer_policy == StreamingProfile.AnswerPolicy.NONE:
        return []
    call.answer_decided_at = timezone.now()
    if profile.answer_policy == StreamingProfile.AnswerPolicy.REJECT:
        return _send(call, "reject", {"cause": profile.reject_cause})
    media = profile.inline_media_params() if profile.auto_start else {}
    if media:
        call.autostarted_at = call.answer_decided_at  # started here, not again on answer
    return _send(call, "answer", media)


def call_answered_policy(*, call: Call) -> list[Command]:
    """Start streaming (and transcription, if asked) on an answered call whose connection has an
    auto-start profile, unless callops already started them inline (answer, dial), or the
    profile streams humans only and no human has been detected yet."""
    if call.autostarted_at is not None or call.is_ended:
        return []
    profile = StreamingProfile.for_call(call)
    if profile is None or not profile.auto_start:
        return []
    if profile.machine_policy == StreamingProfile.MachinePolicy.HUMANS_ONLY and (
        not _is_human(call.machine_detection) and call.awaits_machine_detection
    ):
        return []
    return _start_media(call, profile)


def call_machine_policy(*, call: Call) -> list[Command]:
    """``call.machine.detection.ended``: hang up on a machine, or start the media a
    humans-only profile held back until a human answered."""
    profile = StreamingProfile.for_call(call)
    if profile is None or call.is_ended:
        return []
    policy, result = profile.machine_policy, call.machine_detection
    if result == "machine" and policy == StreamingProfile.MachinePolicy.HANGUP:
        return _send(call, "hangup", {})
    if (
        _is_human(result)
        and policy == StreamingProfile.MachinePolicy.HUMANS_ONLY
        and profile.auto_start
        and call.autostarted_at is None
        and call.answered_at is not None
    ):
        return _start_media(call, profile)
    return []


def _is_human(result: str) -> bool:
    """human, or premium detection's human_residence / human_business."""
    return result.startswith("human")


def _start_media(call: Call, profile: StreamingProfile) -> list[Command]:
    call.autostarted_at = timezone.now()
    created = _send(call, "streaming_start", profile.streaming_params())
    if profile.transcribe:
        created += _send(call, "transcription_start", profile.transcription_params())
    return created


def _send(call: Call, action: str, params: dict) -> list[Command]:
    try:
        command = commands.command_create(
            call=call, action=action, params=params, requested_by=Command.RequestedBy.POLICY
        )
    except (commands.CallEnded, commands.CommandConflict, ParamsInvalid) as exc:
        logger.warning("policy %s on %s not sent: %s", action, call.call_control_id, exc)
        return []
    return [command]
