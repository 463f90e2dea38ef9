"""The default maintenance schedules, created once: operators change them in the admin
(Periodic tasks), and no later deploy overwrites what they set."""

from django.db import migrations

SCHEDULES = [
    # (name, task, every seconds)
    ("callops: stop stale streams", "callops.tasks.stop_stale_sessions", 60),
    ("callops: drain pending webhook events", "callops.tasks.sweep_pending_webhook_events", 30),
    ("callops: repair stuck commands", "callops.tasks.repair_stuck_commands", 30),
    ("callops: purge old records", "callops.tasks.purge_old_records", 3600),
    ("callops: beat heartbeat", "callops.tasks.beat_heartbeat", 30),
]


def create(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    for name, task, seconds in SCHEDULES:
        interval, _ = IntervalSchedule.objects.get_or_create(every=seconds, period="seconds")
        PeriodicTask.objects.get_or_create(
            name=name, defaults={"task": task, "interval": interval, "enabled": True}
        )


def remove(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTask.objects.filter(name__in=[name for name, _, _ in SCHEDULES]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("callops", "0004_sessions_stop_after"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create, remove)]
