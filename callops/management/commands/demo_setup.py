"""Prepare a local demo: an admin login, and a partner whose calls stream and transcribe on answer.

Idempotent: run it as often as you like. The admin's password is set anew on every run and
printed, so the person who just started callops always has a working login.
"""

import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from callops.models import Partner, PartnerConnection, StreamingProfile


class Command(BaseCommand):
    help = "Create the demo admin user, partner, connection and auto-start streaming profile."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--connection-id", default="sim-connection")
        parser.add_argument("--stream-url", default="ws://127.0.0.1:8090/media")
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
            },
        )
        self.stdout.write(f"Admin login: {admin} / {password}")
        self.stdout.write(
            f"Demo partner 'demo' owns connection {connection_id}; answered calls stream to "
            f"{stream_url} and are transcribed."
        )
