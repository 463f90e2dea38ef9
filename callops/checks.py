"""``manage.py check`` tells the operator what is missing before Telnyx finds out."""

from django.conf import settings
from django.core import checks

from callops.telnyx_spec import TRANSCRIPTION_ENGINES

# Said of the environment, not of the service: the check also runs in one-off commands
# (migrate, create_partner) beside a ``./bin/run`` whose processes have the simulator's keys.
SIMULATOR_NOTE = (
    "./bin/run without TELNYX_API_KEY gives the processes it starts the simulator's keys instead."
)


@checks.register(checks.Tags.security)
def telnyx_keys(app_configs, **kwargs):
    messages = []
    if not settings.TELNYX_PUBLIC_KEYS:
        messages.append(
            checks.Warning(
                "TELNYX_PUBLIC_KEY is not set in this environment: a web server started with "
                "it rejects every webhook with 401.",
                hint="Copy the public key from the Telnyx portal (Keys & Credentials). "
                + SIMULATOR_NOTE,
                id="callops.W001",
            )
        )
    if not settings.TELNYX_API_KEY:
        messages.append(
            checks.Warning(
                "TELNYX_API_KEY is not set in this environment: a worker started with it "
                "sends no command Telnyx accepts (401).",
                hint=SIMULATOR_NOTE,
                id="callops.W002",
            )
        )
    return messages


@checks.register()
def transcription_engines(app_configs, **kwargs):
    unknown = [e for e in settings.TELNYX_TRANSCRIPTION_ENGINES if e not in TRANSCRIPTION_ENGINES]
    if not unknown:
        return []
    return [
        checks.Warning(
            f"TELNYX_TRANSCRIPTION_ENGINES names engines the telnyx SDK does not list: "
            f"{', '.join(unknown)}. transcription_start refuses them: callops cannot check "
            "their config.",
            hint=f"Choose among {', '.join(TRANSCRIPTION_ENGINES)}, or upgrade telnyx and run "
            "manage.py telnyx_spec.",
            id="callops.W003",
        )
    ]
