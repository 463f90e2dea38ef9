"""Webhook events get a drain shard and a priority; the pending index follows the drains' claim
order (shard, priority, arrival).

Existing events keep shard 0 and priority 0: shard 0's drain applies them, in arrival order. On
PostgreSQL the new index is built and the old one dropped CONCURRENTLY, so webhooks are stored
throughout; adding the two columns with a constant default rewrites nothing.
"""

import importlib

from django.contrib.postgres.operations import RemoveIndexConcurrently
from django.db import migrations, models

_0008 = importlib.import_module("callops.migrations.0008_webhookevent_received_index")


class RemoveIndexConcurrentlyOnPostgresql(RemoveIndexConcurrently):
    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        return migrations.RemoveIndex.database_forwards(
            self, app_label, schema_editor, from_state, to_state
        )

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        return migrations.RemoveIndex.database_backwards(
            self, app_label, schema_editor, from_state, to_state
        )


class Migration(migrations.Migration):
    atomic = False  # CREATE / DROP INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("callops", "0009_call_control"),
    ]

    operations = [
        migrations.AddField(
            model_name="webhookevent",
            name="priority",
            field=models.PositiveSmallIntegerField(db_default=0, default=0),
        ),
        migrations.AddField(
            model_name="webhookevent",
            name="shard",
            field=models.PositiveSmallIntegerField(db_default=0, default=0),
        ),
        _0008.AddIndexConcurrentlyOnPostgresql(
            model_name="webhookevent",
            index=models.Index(
                condition=models.Q(("status", "pending")),
                fields=["shard", "priority", "received_at"],
                name="webhookevent_claim_idx",
            ),
        ),
        RemoveIndexConcurrentlyOnPostgresql(
            model_name="webhookevent",
            name="webhookevent_pending_idx",
        ),
    ]
