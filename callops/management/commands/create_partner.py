"""Create (or reuse) a partner, attach connection ids, and print a new API key last."""

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from callops.api_keys import api_key_create
from callops.models import Partner, PartnerConnection


class Command(BaseCommand):
    help = "Create a partner if needed, attach connection ids, and print a new API key."

    def add_arguments(self, parser) -> None:
        parser.add_argument("name")
        parser.add_argument(
            "--connection-id",
            action="append",
            default=[],
            dest="connection_ids",
            help="a Telnyx Call Control App id this partner owns (repeatable)",
        )
        parser.add_argument("--key-name", default="", help="a label for the new key")

    @transaction.atomic
    def handle(self, *args, name: str, connection_ids: list[str], key_name: str, **options):
        partner, created = Partner.objects.get_or_create(name=name)
        self.stdout.write(f"{'Created' if created else 'Found'} partner {partner.name}")
        for connection_id in connection_ids:
            owner = PartnerConnection.objects.filter(connection_id=connection_id).first()
            if owner and owner.partner_id != partner.pk:
                raise CommandError(
                    f"connection {connection_id} belongs to partner {owner.partner.name}"
                )
            PartnerConnection.objects.get_or_create(partner=partner, connection_id=connection_id)
            self.stdout.write(f"Connection {connection_id} belongs to {partner.name}")
        _, plain = api_key_create(partner=partner, name=key_name)
        self.stdout.write("API key (shown once, store it now):")
        self.stdout.write(plain)
