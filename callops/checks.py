"""``manage.py check`` tells the operator what is missing before Telnyx finds out."""

from django.conf import settings
from django.core import checks

from callops.telnyx_spec import TRANSCRIPTION_ENGINES


@checks.register(checks.Tags.security)
def telnyx_keys(app_configs, **kwargs):
    messages = []
    if not settings.TELNYX_PUBLIC_KEYS:
        messages.append(
            checks.Warning(
                "TELNYX_PUBLIC_KEY is not set: every webhook will be rejected with 401.",
                hint="Copy the public key from the Telnyx portal (Keys & Credentials).",
                id="callops.W001",
            )
        )
    if not settings.TELNYX_API_KEY:
        messages.append(
            checks.Warning(
                "TELNYX_API_KEY is not set: commands to Telnyx will fail with 401.",
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
