"""The committed OpenAPI schema is the API: it matches the code, and the API keeps to it."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from django.core.management import call_command
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from config.wsgi import application
from tests.helpers import make_call, partner_with_key

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "callops/api/openapi.yaml"
schema = schemathesis.openapi.from_path(SCHEMA_PATH)
pytestmark = pytest.mark.usefixtures("fake_dns")  # the internet's DNS is outside


@pytest.mark.django_db
def test_the_committed_schema_matches_the_code(tmp_path):
    generated = tmp_path / "openapi.yaml"
    call_command("spectacular", "--file", str(generated), "--validate", "--fail-on-warn")
    assert generated.read_text() == SCHEMA_PATH.read_text(), (
        "The API changed: regenerate the schema with "
        "`python manage.py spectacular --file callops/api/openapi.yaml` and commit it"
    )


@pytest.fixture
def api_key(db, monkeypatch):
    """A partner with a call, a command and a profile, so lookups can also succeed."""
    from callops.api.schema import PartnerRateThrottle

    monkeypatch.setattr(PartnerRateThrottle, "THROTTLE_RATES", {"partner": "100000/minute"})
    # Calling the WSGI app directly would close the test's connection between requests.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    partner, client = partner_with_key("schema", "conn-schema")
    make_call("v3:schema-call", "conn-schema")
    yield client.key
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@schema.parametrize()
@hsettings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_every_endpoint_keeps_to_the_schema(case, api_key):
    case.call_and_validate(
        app=application,
        headers={"Authorization": f"Bearer {api_key}"},
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
