"""Create (or reuse) a partner, attach connection ids, and print a new API key last.

Every argument is checked before anything is written, and nothing is printed until the
transaction has committed: a run that fails says why and leaves no partner, connection or key
behind, and never reports one it then rolled back.
"""

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from callops.api_keys import api_key_create
from callops.models import ApiKey, Partner, PartnerConnection


def _check(instance, what: str, field: str) -> None:
    """The model's own field rules (length, blank), said with the argument's name."""
    try:
        instance.clean_fields(exclude=[f.name for f in instance._meta.fields if f.name != field])
    except ValidationError as exc:
        raise CommandError(f"{what}: {' '.join(exc.message_dict[field])}") from None


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

    def handle(self, *args, name: str, connection_ids: list[str], key_name: str, **options):
        name = name.strip()
        _check(Partner(name=name), "name", "name")
        for connection_id in connection_ids:
            _check(PartnerConnection(connection_id=connection_id), "connection id", "connection_id")
        _check(ApiKey(name=key_name), "key name", "name")

        with transaction.atomic():
            partner, created = Partner.objects.get_or_create(name=name)
            for connection_id in connection_ids:
                owner = PartnerConnection.objects.filter(connection_id=connection_id).first()
                if owner and owner.partner_id != partner.pk:
                    raise CommandError(
                        f"connection {connection_id} belongs to partner {owner.partner.name}"
                    )
                PartnerConnection.objects.get_or_create(
                    partner=partner, connection_id=connection_id
                )
            _, plain = api_key_create(partner=partner, name=key_name)

        self.stdout.write(f"{'Created' if created else 'Found'} partner {partner.name}")
        for connection_id in connection_ids:
            self.stdout.write(f"Connection {connection_id} belongs to {partner.name}")
        self.stdout.write("API key (shown once, store it now):")
        self.stdout.write(plain)
