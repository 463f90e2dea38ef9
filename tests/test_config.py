"""Configuration: mistakes are one sentence, production stores are fleet-wide, and the compose
stack and ``.env.example`` work as written."""

from __future__ import annotations

import base64
import sys

import pytest
import yaml
from django.db import connection

from config.settings import environment
from tests.test_project import PRODUCTION_ENV, ROOT, manage, run

SETUP = [sys.executable, "-c", "import django; django.setup()"]


def stopped_with(result, sentence: str) -> None:
    """The process failed with ``sentence`` as its last line, and printed no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback (most recent call last)" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == sentence, result.stderr


def production(**changes: str | None) -> dict[str, str]:
    env = {**PRODUCTION_ENV, **changes}
    return {k: v for k, v in env.items() if v is not None}


# --- One sentence per mistake, from a real process -------------------------------------------

KEY_16_BYTES = base64.b64encode(bytes(16)).decode()


@pytest.mark.parametrize(
    ("changes", "sentence"),
    [
        ({"DJANGO_SECRET_KEY": None}, "callops: DJANGO_SECRET_KEY must be set"),
        ({"DJANGO_SECRET_KEY": ""}, "callops: DJANGO_SECRET_KEY must be set in production"),
        ({"TELNYX_API_KEY": None}, "callops: TELNYX_API_KEY must be set"),
        ({"TELNYX_PUBLIC_KEY": ""}, "callops: TELNYX_PUBLIC_KEY must be set in production"),
        (
            {"TELNYX_PUBLIC_KEY": "not a key!"},
            "callops: TELNYX_PUBLIC_KEY is not valid base64 "
            "(set it to the public key from the Telnyx portal)",
        ),
        (
            {"TELNYX_PUBLIC_KEY": f"{PRODUCTION_ENV['TELNYX_PUBLIC_KEY']},{KEY_16_BYTES}"},
            "callops: TELNYX_PUBLIC_KEY decodes to 16 bytes, not the 32 of an Ed25519 public key "
            "(set it to the public key from the Telnyx portal)",
        ),
        (
            {"DATABASE_URL": "postgres://callops@db:port/callops"},
            "callops: DATABASE_URL is not a valid URL "
            "(expected postgres://user:password@host:5432/name)",
        ),
        (
            {"REDIS_URL": "redis.internal:6379"},
            "callops: REDIS_URL is not a valid URL (expected redis://host:6379/0)",
        ),
        (
            {"CELERY_BROKER_URL": "redis//redis:6379/0"},
            "callops: CELERY_BROKER_URL is not a valid URL (expected redis://host:6379/0)",
        ),
        (
            {"CACHE_URL": "memcached://cache:11211"},
            "callops: CACHE_URL is not a valid URL (expected redis://host:6379/1)",
        ),
        (
            {"CALLOPS_RATE_LIMIT_URL": "/var/lib/callops/ratelimit.json"},
            "callops: CALLOPS_RATE_LIMIT_URL is not a valid URL (expected redis://host:6379/1)",
        ),
        (
            {"TELNYX_BASE_URL": "api.telnyx.com/v2"},
            "callops: TELNYX_BASE_URL is not a valid URL (expected https://api.telnyx.com/v2)",
        ),
        ({"TELNYX_TIMEOUT": "soon"}, "callops: TELNYX_TIMEOUT is not a number"),
        (
            {"CALLOPS_METRICS_ALLOWED_NETWORKS": "10.0.0.0/8,10.0.0.0/33"},
            "callops: CALLOPS_METRICS_ALLOWED_NETWORKS has an entry that is not a network"
            " (expected 10.0.0.0/8, ::1/128)",
        ),
        ({"LOG_FORMAT": "xml"}, "callops: LOG_FORMAT is not json or text"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_it_stops_a_misconfigured_process_with_one_sentence(changes, sentence):
    stopped_with(run(SETUP, production(**changes)), sentence)


def test_it_says_the_same_sentence_to_manage_py_celery_and_gunicorn():
    env = production(TELNYX_PUBLIC_KEY="c2hvcnQ=")
    sentence = (
        "callops: TELNYX_PUBLIC_KEY decodes to 5 bytes, not the 32 of an Ed25519 public key "
        "(set it to the public key from the Telnyx portal)"
    )
    stopped_with(manage("check", "--deploy", env=env), sentence)
    celery = [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "solo"]
    stopped_with(run(celery, env, timeout=30), sentence)
    # gunicorn reads the settings in its master (config/gunicorn.py): one sentence and an exit,
    # not workers dying as they boot and being started again forever.
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py", "-b", "127.0.0.1:0"]
    stopped_with(run([*gunicorn, "config.wsgi:application"], env, timeout=30), sentence)


# --- Production refuses a store only one host sees -------------------------------------------


@pytest.mark.parametrize(
    ("changes", "sentence"),
    [
        (
            {"REDIS_URL": None},
            "callops: CELERY_BROKER_URL (or REDIS_URL) must point at Redis in production, "
            "not a per-host file",
        ),
        (
            {"REDIS_URL": None, "CELERY_BROKER_URL": "redis://127.0.0.1:6379/8"},
            "callops: CACHE_URL (or REDIS_URL) must point at Redis in production: the API "
            "throttle and the sweeper's lock must be shared by every host, not kept in a "
            "per-host file",
        ),
        (
            {"CALLOPS_RATE_LIMIT_URL": ""},
            "callops: CALLOPS_RATE_LIMIT_URL (or REDIS_URL) must point at Redis in production: "
            "the Telnyx rate limit must be shared by every worker, not kept in a per-host file",
        ),
    ],
    ids=["broker", "cache", "rate-limiter"],
)
def test_production_refuses_a_per_host_store(changes, sentence):
    stopped_with(run(SETUP, production(**changes)), sentence)


def test_production_runs_every_fleet_wide_store_on_redis():
    script = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.CACHES['default']['BACKEND'], s.CALLOPS_RATE_LIMIT_URL, s.CELERY_BROKER_URL)"
    )
    result = run([sys.executable, "-c", script], production())
    assert result.returncode == 0, result.stderr
    redis = PRODUCTION_ENV["REDIS_URL"]
    assert result.stdout.split() == ["django.core.cache.backends.redis.RedisCache", redis, redis]


# --- The checks themselves, in this process ---------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("nonsense", "is not a database URL"),
        ("postgres://callops@db", "must name a database"),
        ("postgres://callops@db:5432/", "must name a database"),
        ("postgres://callops@db:port/callops", "is not a valid URL"),
        ("", "must be set"),
    ],
)
def test_it_refuses_a_database_url_it_cannot_use(value, problem):
    with pytest.raises(SystemExit, match=f"^callops: DATABASE_URL {problem}"):
        environment.check_database_url("DATABASE_URL", value)


@pytest.mark.parametrize(
    "value",
    [
        "sqlite:////tmp/callops.sqlite3",
        "sqlite://:memory:",
        "postgres://u:p@db:5432/callops",
        "postgres://callops@/callops?host=/var/run/postgresql",
        "pgsql://db/callops",
    ],
)
def test_it_takes_the_database_urls_django_environ_reads(value):
    assert environment.check_database_url("DATABASE_URL", value) == value


def accepted(name: str, value: str, schemes: tuple[str, ...]) -> bool:
    try:
        assert environment.check_url(name, value, schemes, "redis://host:6379/0") == value
    except SystemExit as refused:
        assert str(refused).startswith(f"callops: {name} ")
        return False
    return True


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("redis://cache:6379/1", True),
        ("rediss://user:secret@cache:6380/0", True),
        ("unix:///run/redis.sock", True),
        ("memcached://cache:11211", False),
        ("redis://:6379/0", False),
        ("redis://cache:port/0", False),
        ("file:///var/lib/callops/ratelimit.json", False),
    ],
)
def test_it_takes_only_redis_for_a_shared_store(value, ok):
    assert accepted("CACHE_URL", value, environment.REDIS_SCHEMES) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("sentinel://s1:26379;sentinel://s2:26379", True),
        ("redis://r1:6379/0;redis://r2:6379/0", True),
        ("redis://r1:6379/0;amqp://mq", False),
    ],
)
def test_it_checks_each_url_of_a_broker_failover_list(value, ok):
    assert accepted("CELERY_BROKER_URL", value, environment.BROKER_SCHEMES) is ok


def test_a_sentence_never_repeats_the_value_it_refuses():
    with pytest.raises(SystemExit) as refused:
        environment.check_url(
            "REDIS_URL", "redis://:hunter2@cache:port/0", ("redis",), "redis://host:6379/0"
        )
    assert "hunter2" not in str(refused.value)


def test_it_takes_a_real_key_and_a_rotation():
    keys = [PRODUCTION_ENV["TELNYX_PUBLIC_KEY"], base64.b64encode(bytes(32)).decode()]
    assert environment.check_public_keys("TELNYX_PUBLIC_KEY", keys) == keys


# --- /healthz for probes, /readyz on an unmigrated database ----------------------------------


def test_healthz_answers_a_probe_whatever_its_host(client, settings):
    settings.ALLOWED_HOSTS = ["callops.example.com"]
    assert client.get("/healthz", HTTP_HOST="127.0.0.1:8000").status_code == 200
    assert client.get("/healthz", HTTP_HOST="10.0.3.7").json() == {"status": "ok"}


def test_only_healthz_skips_host_validation(client, settings):
    settings.ALLOWED_HOSTS = ["callops.example.com"]
    assert client.get("/readyz", HTTP_HOST="127.0.0.1:8000").status_code == 400
    assert client.get("/healthz/", HTTP_HOST="127.0.0.1:8000").status_code == 400
    assert client.get("/admin/", HTTP_HOST="127.0.0.1:8000").status_code == 400


@pytest.mark.django_db
def test_readyz_on_an_unmigrated_database_is_unavailable(client):
    # The test's transaction is rolled back afterwards, the table with it.
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE callops_taskrun CASCADE")
    response = client.get("/readyz")
    assert (response.status_code, response.json()) == (503, {"status": "unavailable"})


# --- docker-compose.yml -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


APP_SERVICES = ("web", "worker", "worker-events", "beat")


@pytest.mark.parametrize("name", APP_SERVICES)
def test_compose_starts_a_service_only_after_migrate_finished(compose, name):
    depends_on = compose["services"][name]["depends_on"]
    assert depends_on["migrate"] == {"condition": "service_completed_successfully"}
    assert depends_on["postgres"] == depends_on["redis"] == {"condition": "service_healthy"}
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["python", "manage.py", "migrate", "--no-input"]
    assert migrate["restart"] == "no"


@pytest.mark.parametrize("name", [*APP_SERVICES, "postgres", "redis"])
def test_compose_gives_every_long_running_service_a_healthcheck(compose, name):
    assert compose["services"][name]["healthcheck"]["test"]


@pytest.mark.parametrize("name", ["worker", "worker-events"])
def test_compose_pings_each_worker_by_the_name_it_runs_under(compose, name):
    service = compose["services"][name]
    command = service["command"]
    node = command[command.index("-n") + 1]
    assert node.endswith("@%h")
    kind, test = service["healthcheck"]["test"]
    # $$ is compose's escape: the shell in the container expands $HOSTNAME, which %h is.
    assert kind == "CMD-SHELL"
    assert test.split()[:4] == ["celery", "-A", "config", "inspect"]
    assert f"-d {node.removesuffix('%h')}$$HOSTNAME " in test


def test_compose_keeps_the_data_services_data_in_volumes(compose):
    volumes = compose["volumes"].keys()
    for name, path in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        mounts = dict(m.split(":", 1) for m in compose["services"][name]["volumes"])
        assert path in mounts.values()
        assert set(mounts) <= volumes
    assert "--appendonly" in compose["services"]["redis"]["command"]


def test_compose_web_healthcheck_is_answered_under_production_hosts(compose, client, settings):
    test = compose["services"]["web"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert "http://127.0.0.1:8000/healthz" in test[3]
    settings.ALLOWED_HOSTS = PRODUCTION_ENV["DJANGO_ALLOWED_HOSTS"].split(",")
    assert client.get("/healthz", HTTP_HOST="127.0.0.1:8000").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_compose_beat_healthcheck_passes_only_after_a_recent_heartbeat(compose):
    from callops import tasks

    test = compose["services"]["beat"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "manage.py"]
    db = connection.settings_dict
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
    }
    check = [sys.executable, *test[2:]]
    assert run(check, env).returncode == 1
    tasks.beat_heartbeat()
    result = run(check, env)
    assert result.returncode == 0, result.stderr


# --- .env.example: copying it as the README says changes nothing ------------------------------


def test_env_example_is_all_comments():
    lines = (ROOT / ".env.example").read_text().splitlines()
    assert [line for line in lines if line.strip() and not line.startswith("#")] == []


def _settings_seen(module: str, env_file: str) -> list[str]:
    script = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL, bool(s.SECRET_KEY), "
        "','.join(s.ALLOWED_HOSTS))"
    )
    result = run(
        [sys.executable, "-c", script],
        {"DJANGO_SETTINGS_MODULE": module, "CALLOPS_ENV_FILE": env_file},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_a_copied_env_example_leaves_the_embedded_run_as_it_was(tmp_path):
    copied = tmp_path / ".env"
    copied.write_text((ROOT / ".env.example").read_text())
    assert _settings_seen("config.settings.dev", str(copied)) == _settings_seen(
        "config.settings.dev", ""
    )


def test_an_env_filled_in_for_compose_keeps_the_embedded_run_local(tmp_path):
    filled = tmp_path / ".env"
    text = (ROOT / ".env.example").read_text()
    for line in ("DJANGO_SECRET_KEY=", "DJANGO_ALLOWED_HOSTS=callops.example.com"):
        text = text.replace(f"# {line}\n", f"{line}\n")
    filled.write_text(text)
    engine, broker, has_secret, hosts = _settings_seen("config.settings.dev", str(filled))
    assert (engine, broker, has_secret) == ("django.db.backends.sqlite3", "filesystem://", "True")
    assert {"127.0.0.1", "localhost", "callops.example.com"} <= set(hosts.split(","))


def test_the_test_settings_never_read_an_env_file(tmp_path):
    dev_file = tmp_path / ".env"
    dev_file.write_text(
        "DATABASE_URL=postgres://callops:callops@127.0.0.1:5432/callops_dev\n"
        "REDIS_URL=redis://127.0.0.1:6379/0\n"
    )
    seen = _settings_seen("config.settings.test", str(dev_file))
    assert seen[1] == "redis://127.0.0.1:6379/14"
