"""Prepare a local demo: an admin login, and a partner whose incoming calls callops answers
with streaming and transcription inline.

Idempotent: run it as often as you like. The admin's password and the demo partner's API key
are made anew on every run and printed (the key is also kept in ``var/demo_partner_key`` for
the demo dialer), so the person who just started callops always has a working login and key.
"""

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from callops.api_keys import api_key_create, api_key_revoke
from callops.management.commands._demo import demo_key_file, shown
from callops.models import ApiKey, Partner, PartnerConnection, StreamingProfile

DEMO_KEY_NAME = "demo (made by demo_setup)"
REJECT_CONNECTION = "sim-reject"


class Command(BaseCommand):
    help = "Create the demo admin user, partner, connection and auto-start streaming profile."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--connection-id", default="sim-connection")
        parser.add_argument(
            "--stream-url",
            default="ws://127.0.0.1:8090/media",
            help="where the demo profile streams (runstack passes its --media-port's)",
        )
        parser.add_argument("--admin", default="admin")

    @transaction.atomic
    def handle(self, *args, connection_id: str, stream_url: str, admin: str, **options) -> None:
        password = secrets.token_urlsafe(12)
        user, _ = get_user_model().objects.get_or_create(
            username=admin, defaults={"email": f"{admin}@localhost"}
        )
        user.is_staff = user.is_superuser = True
        user.set_password(password)
        user.save()

        partner, _ = Partner.objects.get_or_create(name="demo")
        PartnerConnection.objects.get_or_create(
            connection_id=connection_id, defaults={"partner": partner}
        )
        StreamingProfile.objects.update_or_create(
            partner=partner,
            connection_id="",
            defaults={
                "name": "demo: stream and transcribe every answered call",
                "stream_url": stream_url,
                "stream_track": "both_tracks",
                "stream_codec": "PCMU",
                "stream_auth_token": secrets.token_urlsafe(16),
                "transcribe": True,
                "transcription_engine": "Telnyx",
                "transcription_tracks": "both",
                "max_stream_duration": 600,
                "auto_start": True,
                "answer_policy": StreamingProfile.AnswerPolicy.ANSWER,
                "machine_policy": StreamingProfile.MachinePolicy.HANGUP,
            },
        )
        # A second connection whose calls callops rejects, so the demo shows both policies.
        PartnerConnection.objects.get_or_create(
            connection_id=REJECT_CONNECTION, defaults={"partner": partner}
        )
        StreamingProfile.objects.update_or_create(
            partner=partner,
            connection_id=REJECT_CONNECTION,
            defaults={
                "name": "demo: reject every incoming call",
                "stream_url": stream_url,
                "answer_policy": StreamingProfile.AnswerPolicy.REJECT,
                "reject_cause": "USER_BUSY",
            },
        )
        for old in ApiKey.objects.filter(partner=partner, name=DEMO_KEY_NAME, revoked_at=None):
            api_key_revoke(key=old)
        _, key = api_key_create(partner=partner, name=DEMO_KEY_NAME)
        key_file = demo_key_file()
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
        self.stdout.write(f"Admin login: {admin} / {password}")
        self.stdout.write(
            f"Demo partner 'demo' owns connection {connection_id}; callops answers its incoming "
            f"calls with streaming to {stream_url} and transcription inline, and rejects "
            f"those on {REJECT_CONNECTION}."
        )
        self.stdout.write(f"Demo partner API key (also in {shown(key_file)}): {key}")
