"""The simulator package plays Telnyx: it stands apart from callops, and signs and shapes
webhooks as Telnyx does. No database."""

from __future__ import annotations

import ast
import base64
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from nacl.signing import VerifyKey

from telnyx_sim import Signer, dumps, envelope, load_signing_key
from telnyx_sim.envelopes import event, wrap

ROOT = Path(__file__).resolve().parent.parent


def test_it_imports_neither_django_nor_callops():
    code = (
        "import sys, telnyx_sim, telnyx_sim.__main__\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('django', 'callops', 'config')])"
    )
    env = {"PATH": "/usr/bin:/bin"}  # no DJANGO_SETTINGS_MODULE, nothing inherited
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_callops_never_imports_it():
    """The web process must not need the simulator: callops is shipped without it."""
    offenders = []
    for path in (ROOT / "callops").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(name.split(".")[0] == "telnyx_sim" for name in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_its_signature_is_ed25519_over_timestamp_and_body():
    signer = Signer()
    body = dumps(envelope("call.answered"))
    headers = signer.headers(body, timestamp=1_700_000_000)
    assert set(headers) == {"telnyx-signature-ed25519", "telnyx-timestamp"}
    assert headers["telnyx-timestamp"] == "1700000000"
    key = VerifyKey(base64.b64decode(signer.public_key))
    key.verify(b"1700000000|" + body, base64.b64decode(headers["telnyx-signature-ed25519"]))


def test_it_gives_the_same_headers_keyed_for_a_wsgi_environ():
    signer = Signer()
    body = b"{}"
    assert signer.wsgi_headers(body, timestamp=5) == {
        "HTTP_TELNYX_SIGNATURE_ED25519": signer.headers(body, timestamp=5)[
            "telnyx-signature-ed25519"
        ],
        "HTTP_TELNYX_TIMESTAMP": "5",
    }


def test_a_signer_can_use_a_key_kept_in_a_file(tmp_path):
    signer = Signer(load_signing_key(tmp_path / "sk"))
    assert Signer(load_signing_key(tmp_path / "sk")).public_key == signer.public_key
    assert signer.write_public_key(tmp_path / "pk").read_text() == signer.public_key + "\n"


def test_an_envelope_is_shaped_like_telnyxs():
    moment = datetime(2026, 11, 25, 18, 0, tzinfo=UTC)
    built = envelope(
        "call.hangup", "v3:x", occurred_at=moment, event_id="e-1", attempt=3, hangup_cause="busy"
    )
    assert built == {
        "data": {
            "record_type": "event",
            "event_type": "call.hangup",
            "id": "e-1",
            "occurred_at": "2026-11-25T18:00:00.000000Z",
            "payload": {
                "call_control_id": "v3:x",
                "call_leg_id": "leg-v3:x",
                "call_session_id": "session-v3:x",
                "connection_id": "conn-1",
                "client_state": None,
                "from": "+15551230000",
                "to": "+15559870000",
                "hangup_cause": "busy",
            },
        },
        "meta": {"attempt": 3, "delivered_to": "http://testserver/webhooks/telnyx/"},
    }
    assert json.loads(dumps(built)) == built
    assert b" " not in dumps(built)


def test_redelivery_keeps_the_event_and_counts_the_attempt():
    data = event("call.answered", **{"from": "+15550001111"})
    assert data["payload"]["from"] == "+15550001111"
    again = wrap(data, attempt=2, delivered_to="https://example.com/hook")
    assert again == {
        "data": data,
        "meta": {"attempt": 2, "delivered_to": "https://example.com/hook"},
    }


def test_the_cli_prints_the_public_key_of_its_key_file(tmp_path):
    key = load_signing_key(tmp_path / "sk")
    result = subprocess.run(
        [sys.executable, "-m", "telnyx_sim", "--print-public-key"]
        + ["--signing-key-file", str(tmp_path / "sk")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == Signer(key).public_key


def test_its_command_line_takes_the_call_plan_options():
    from telnyx_sim.__main__ import parser

    options = parser().parse_args(
        ["--ring-timeout", "5", "--answered-elsewhere", "--dial-shares", "1,0,0"]
        + ["--machine-shares", "0,1,0", "--dtmf-interval", "0"]
    )
    assert (options.ring_timeout, options.answered_elsewhere) == (5.0, True)
    assert (options.dial_shares, options.machine_shares) == ((1, 0, 0), (0, 1, 0))
    assert parser().parse_args([]).answered_elsewhere is False

    result = subprocess.run(
        [sys.executable, "-m", "telnyx_sim", "--dial-shares", "1,0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "three weights" in result.stderr
