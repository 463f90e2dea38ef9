"""The commands a new user runs first: ``create_partner``, ``demo_setup`` and the demo's
webhook receiver (``demo_receiver``), on the real database and a real HTTP server."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from callops.models import Partner, PartnerConnection

pytestmark = pytest.mark.django_db


def run(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


# --- create_partner ---------------------------------------------------------------------------


def test_it_says_nothing_was_created_when_a_connection_belongs_to_another_partner():
    owner = Partner.objects.create(name="alice")
    PartnerConnection.objects.create(partner=owner, connection_id="conn-alice")
    out = StringIO()
    with pytest.raises(CommandError, match="conn-alice belongs to partner alice"):
        call_command(
            "create_partner", "mallory", "--connection-id", "c-new",
            "--connection-id", "conn-alice", stdout=out,
        )  # fmt: skip
    assert "Created" not in out.getvalue()
    assert out.getvalue() == ""
    assert not Partner.objects.filter(name="mallory").exists()
    assert not PartnerConnection.objects.filter(connection_id="c-new").exists()


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["x" * 101], "name"),
        (["  "], "name"),
        (["bob", "--connection-id", ""], "connection id"),
        (["bob", "--connection-id", "c" * 256], "connection id"),
        (["bob", "--key-name", "k" * 101], "key name"),
    ],
)
def test_it_refuses_a_bad_argument_naming_it_and_creates_nothing(args, field):
    out = StringIO()
    with pytest.raises(CommandError, match=field):
        call_command("create_partner", *args, stdout=out)
    assert out.getvalue() == ""
    assert not Partner.objects.exists()


def test_it_prints_created_then_found_and_the_key_last():
    first, _ = run("create_partner", "carol", "--connection-id", "c-1")
    assert first.splitlines()[0] == "Created partner carol"
    assert first.splitlines()[-1].startswith("cok_")
    again, _ = run("create_partner", "carol", "--connection-id", "c-1")
    assert again.splitlines()[0] == "Found partner carol"
    assert Partner.objects.get(name="carol").api_keys.count() == 2
