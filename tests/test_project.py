"""The project's own files: settings per environment, compose file, migrations."""

from __future__ import annotations

import importlib
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.core.management import get_commands

ROOT = Path(__file__).resolve().parent.parent

PRODUCTION_ENV = {
    "DJANGO_SETTINGS_MODULE": "config.settings.production",
    "DJANGO_SECRET_KEY": "x" * 60 + "-production-like-secret-for-checks",
    "DJANGO_ALLOWED_HOSTS": "callops.example.com",
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/callops",
    "REDIS_URL": "redis://127.0.0.1:6379/14",
    "TELNYX_API_KEY": "KEY-test",
    "TELNYX_PUBLIC_KEY": "LrwLeGRbXNWBoyE4HppQeCUkOqT+A7CF9+lD/2EEG5s=",
}


def run(argv: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """``argv`` in the checkout with only ``env`` for configuration: none of ours inherited, and a
    developer's .env changes nothing."""
    ours = ("DJANGO_", "TELNYX_", "CALLOPS_", "DATABASE_URL", "REDIS_URL", "CELERY_", "CACHE_URL")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    return subprocess.run(
        argv,
        cwd=ROOT,
        env={**clean, "CALLOPS_ENV_FILE": "", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run([sys.executable, "manage.py", *args], env)


def test_production_settings_pass_check_deploy():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    "missing",
    [
        "DJANGO_SECRET_KEY",
        "DJANGO_ALLOWED_HOSTS",
        "DATABASE_URL",
        "TELNYX_API_KEY",
        "TELNYX_PUBLIC_KEY",
        "REDIS_URL",
    ],
)
def test_production_settings_refuse_to_start_without_a_secret(missing):
    env = {k: v for k, v in PRODUCTION_ENV.items() if k != missing}
    result = manage("check", env=env)
    assert result.returncode != 0
    assert missing in result.stderr or "CELERY_BROKER_URL" in result.stderr


def test_production_settings_refuse_a_wildcard_host():
    result = manage("check", env={**PRODUCTION_ENV, "DJANGO_ALLOWED_HOSTS": "*"})
    assert result.returncode != 0
    assert "DJANGO_ALLOWED_HOSTS" in result.stderr


def test_check_warns_when_telnyx_keys_are_missing():
    result = manage("check", env={"DJANGO_SETTINGS_MODULE": "config.settings.dev"})
    assert "callops.W001" in result.stderr + result.stdout


def _command_is_real(argv: list[str]) -> None:
    if argv[:2] == ["python", "manage.py"]:
        assert argv[2] in get_commands(), f"no management command {argv[2]!r}"
    elif argv[0] == "gunicorn":
        args = list(argv[1:])
        if "-c" in args:
            at = args.index("-c")
            _gunicorn_config_is_valid(ROOT / args[at + 1])
            del args[at : at + 2]
        module, _, attr = args[0].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
    elif argv[0] == "celery":
        assert argv[1] == "-A"
        app = importlib.import_module(argv[2]).celery_app
        assert argv[3] in ("worker", "beat")
        assert app.main == "callops"
    else:
        raise AssertionError(f"unexpected command {argv}")


def _gunicorn_config_is_valid(path: Path) -> None:
    """Every setting the file defines is one gunicorn knows, with a value it accepts."""
    from gunicorn.config import Config

    config = Config()
    defined = {k: v for k, v in runpy.run_path(str(path)).items() if not k.startswith("_")}
    known = {k: v for k, v in defined.items() if k in config.settings}
    assert known.keys() >= {"bind", "workers", "worker_class", "timeout"}
    for name, value in known.items():
        config.set(name, value)  # raises on a value gunicorn would refuse
    assert config.workers >= 1


def test_every_compose_command_names_a_real_module_or_command():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "web", "worker", "beat"} <= services.keys()
    ours = {name: s for name, s in services.items() if s.get("build")}
    assert {"web", "worker", "beat"} <= ours.keys()
    assert len({s["image"] for s in ours.values()}) == 1, "one image for web, worker and beat"
    for service in ours.values():
        _command_is_real(service["command"])


def test_the_dockerfile_command_is_real():
    cmd = next(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD")
    )
    _command_is_real(yaml.safe_load(cmd.removeprefix("CMD ")))


def test_env_example_documents_every_variable_the_settings_read():
    documented = (ROOT / ".env.example").read_text() + (ROOT / "README.md").read_text()
    for name in (
        "DATABASE_URL",
        "CELERY_BROKER_URL",
        "REDIS_URL",
        "TELNYX_API_KEY",
        "TELNYX_PUBLIC_KEY",
        "TELNYX_BASE_URL",
        "DJANGO_SECRET_KEY",
        "DJANGO_ALLOWED_HOSTS",
        "DJANGO_SETTINGS_MODULE",
    ):
        assert name in documented
    settings_text = "".join(p.read_text() for p in (ROOT / "config/settings").glob("*.py"))
    import re

    for name in set(re.findall(r'env\.\w+\(\s*"([A-Z_]+)"', settings_text)):
        assert name in documented, f"{name} is read by the settings but not documented"


def _webhookevent_indexes() -> dict[str, tuple[list[str], bool]]:
    from django.db import connection

    with connection.cursor() as cursor:
        found = connection.introspection.get_constraints(cursor, "callops_webhookevent")
    return {
        name: (c["columns"], c["unique"])
        for name, c in found.items()
        if (c["index"] or c["unique"]) and not c["primary_key"]
    }


@pytest.mark.django_db(transaction=True)
def test_migration_0007_renames_in_place_and_reverses():
    """On PostgreSQL 0007 keeps the existing indexes (renamed) and drops only the LIKE copies;
    unapplying it restores 0006's indexes under their old names."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    def migrate(target: str) -> None:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate([("callops", target)])

    latest = _webhookevent_indexes()  # 0012 replaced 0007's call index by (call, type)
    assert latest["webhookevent_call_type_idx"] == (["call_control_id", "event_type"], False)
    assert "webhookevent_call_idx" not in latest
    leaf = MigrationExecutor(connection).loader.graph.leaf_nodes("callops")[0][1]
    try:
        migrate("0007_webhookevent_plain_indexes")
        after = _webhookevent_indexes()
        assert after["webhookevent_event_id_uniq"] == (["event_id"], True)
        assert after["webhookevent_call_idx"] == (["call_control_id"], False)
        assert not [name for name in after if name.endswith("_like")]
        migrate("0006_drain_flag")
        before = _webhookevent_indexes()
        assert before["callops_webhookevent_event_id_key"] == (["event_id"], True)
        assert before["callops_webhookevent_call_control_id_528feb20"] == (
            ["call_control_id"],
            False,
        )
        assert sum(name.endswith("_like") for name in before) == 2
        kept = (
            _index_oid("callops_webhookevent_event_id_key"),
            _index_oid("callops_webhookevent_call_control_id_528feb20"),
        )
        migrate("0007_webhookevent_plain_indexes")
        assert _webhookevent_indexes() == after
        # The same index objects, renamed: nothing was rebuilt.
        assert (
            _index_oid("webhookevent_event_id_uniq"),
            _index_oid("webhookevent_call_idx"),
        ) == kept
    finally:
        migrate(leaf)
    assert _webhookevent_indexes() == latest


def _index_oid(name: str) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::regclass::oid", [name])
        return cursor.fetchone()[0]


# --- /readyz: ready or not for everyone, the details for staff and the token's holder --------


def _readyz(client, token: str | None = None):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token is not None else {}
    return client.get("/readyz", **headers)


@pytest.fixture
def failing_task(db):
    """A task whose last run failed with an error text that must not leak to anyone."""
    from callops.models import TaskRun

    return TaskRun.objects.create(name="purge_old_records", last_error="relation x: secret-ish")


@pytest.mark.django_db
def test_readyz_tells_an_anonymous_caller_only_whether_it_is_ready(client, failing_task):
    from callops import tasks

    not_ready = _readyz(client)
    assert (not_ready.status_code, not_ready.json()) == (503, {"status": "unavailable"})
    tasks.beat_heartbeat()
    ready = _readyz(client)
    assert (ready.status_code, ready.json()) == (200, {"status": "ok"})


@pytest.mark.django_db
def test_readyz_details_need_the_configured_token(client, settings, failing_task):
    from callops import tasks

    tasks.beat_heartbeat()
    settings.CALLOPS_READYZ_TOKEN = "readyz-token-1"
    assert _readyz(client, "readyz-token-2").json() == {"status": "ok"}
    assert _readyz(client, "readyz-token-").json() == {"status": "ok"}
    detailed = _readyz(client, "readyz-token-1")
    assert detailed.status_code == 200
    body = detailed.json()
    assert body["checks"] == {"database": "ok", "broker": "ok", "beat": "ok"}
    assert body["tasks"]["purge_old_records"]["last_error"] == "relation x: secret-ish"
    assert "beat_heartbeat" in body["tasks"]


@pytest.mark.django_db
def test_readyz_without_a_configured_token_takes_no_token(client, settings, failing_task):
    settings.CALLOPS_READYZ_TOKEN = ""
    assert _readyz(client, "").json() == {"status": "unavailable"}
    assert _readyz(client, "anything").json() == {"status": "unavailable"}


@pytest.mark.django_db
def test_readyz_details_for_a_staff_session_and_no_other(client, failing_task):
    from django.contrib.auth import get_user_model

    users = get_user_model().objects
    client.force_login(users.create_user("partner-person", password="pw"))
    assert _readyz(client).json() == {"status": "unavailable"}
    client.force_login(users.create_user("ops", password="pw", is_staff=True))
    body = _readyz(client).json()
    assert body["checks"]["beat"] == "no heartbeat yet"
    assert body["tasks"]["purge_old_records"]["last_error"] == "relation x: secret-ish"


@pytest.mark.django_db
def test_readyz_names_a_broker_outage_only_to_the_token_holder(client, settings, broker_down):
    from callops import tasks

    tasks.beat_heartbeat()
    settings.CALLOPS_READYZ_TOKEN = "readyz-token-1"
    assert _readyz(client).json() == {"status": "unavailable"}
    detailed = _readyz(client, "readyz-token-1")
    assert detailed.status_code == 503
    assert detailed.json()["checks"]["broker"].startswith("unavailable: ")
