"""The broker boundary: services hand work to Celery here, by task name.

Services never import ``callops.tasks`` (the entry points import the services, not the other
way round). A task is published by its registered name, through the task object when this
process has it, so its options apply exactly as ``task.apply_async`` would.
"""

from __future__ import annotations

from typing import Any

from celery import current_app

from callops import logs

SEND_COMMAND = "callops.tasks.send_command"
SEND_COMMANDS = "callops.tasks.send_commands"
DRAIN_WEBHOOK_EVENTS = "callops.tasks.drain_webhook_events"
DRAIN_URGENT_EVENTS = "callops.tasks.drain_urgent_events"
DELIVER_PARTNER_EVENT = "callops.tasks.deliver_partner_event"


def publish(name: str, *args: Any, countdown: float = 0.0, **kwargs: Any) -> None:
    """Publish one task message. Raises whatever the broker raised: callers decide what a
    broker outage means for them (every caller here has a database-side fallback)."""
    # The log context crosses with the message: the worker's lines carry the same correlation
    # id (callops.logs.restored).
    options: dict[str, Any] = {"retry": False, "headers": {logs.HEADER: logs.carried()}}
    if countdown > 0:
        options["countdown"] = countdown
    current_app.signature(name, args=args, kwargs=kwargs).apply_async(**options)
