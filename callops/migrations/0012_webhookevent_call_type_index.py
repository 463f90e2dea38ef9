"""A call's events are looked up by call and type (a stream's starts and stops): one index on
both replaces the call-only index, which it also serves. On PostgreSQL both changes run
CONCURRENTLY, so webhooks are stored throughout.
"""

import importlib

from django.db import migrations, models

_0008 = importlib.import_module("callops.migrations.0008_webhookevent_received_index")
_0010 = importlib.import_module("callops.migrations.0010_drain_shards")


class Migration(migrations.Migration):
    atomic = False  # CREATE / DROP INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("callops", "0011_operator_permissions"),
    ]

    operations = [
        _0008.AddIndexConcurrentlyOnPostgresql(
            model_name="webhookevent",
            index=models.Index(
                fields=["call_control_id", "event_type"], name="webhookevent_call_type_idx"
            ),
        ),
        _0010.RemoveIndexConcurrentlyOnPostgresql(
            model_name="webhookevent",
            name="webhookevent_call_idx",
        ),
    ]
