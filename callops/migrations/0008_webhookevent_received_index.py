"""An index on WebhookEvent.received_at for the admin's list: newest first, the date filter and
the date drill-down would otherwise read the whole table.

On PostgreSQL it is built with CREATE INDEX CONCURRENTLY, so webhooks are stored while it
builds; other databases get a plain CREATE INDEX.
"""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class AddIndexConcurrentlyOnPostgresql(AddIndexConcurrently):
    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        return migrations.AddIndex.database_forwards(
            self, app_label, schema_editor, from_state, to_state
        )

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        return migrations.AddIndex.database_backwards(
            self, app_label, schema_editor, from_state, to_state
        )


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("callops", "0007_webhookevent_plain_indexes"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgresql(
            model_name="webhookevent",
            index=models.Index(fields=["received_at"], name="webhookevent_received_idx"),
        ),
    ]
