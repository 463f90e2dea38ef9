"""WebhookEvent: event_id's unique constraint and call_control_id's index move to Meta, and the
``varchar_pattern_ops`` copies that ``unique=True`` / ``db_index=True`` built on PostgreSQL go.

On PostgreSQL the existing unique index and plain index are kept and renamed: the generic
operations would drop and rebuild them, holding a write lock on the table (every webhook would
wait, then get 503s) for as long as a large table takes to index. Elsewhere the generic
operations run.
"""

from django.db import migrations, models

TABLE = "callops_webhookevent"

POSTGRESQL_FORWARDS = [
    f"ALTER TABLE {TABLE} RENAME CONSTRAINT callops_webhookevent_event_id_key"
    " TO webhookevent_event_id_uniq",
    "DROP INDEX callops_webhookevent_event_id_dcf7690e_like",
    "ALTER INDEX callops_webhookevent_call_control_id_528feb20 RENAME TO webhookevent_call_idx",
    "DROP INDEX callops_webhookevent_call_control_id_528feb20_like",
]
POSTGRESQL_BACKWARDS = [
    f"ALTER TABLE {TABLE} RENAME CONSTRAINT webhookevent_event_id_uniq"
    " TO callops_webhookevent_event_id_key",
    f"CREATE INDEX callops_webhookevent_event_id_dcf7690e_like ON {TABLE}"
    " (event_id varchar_pattern_ops)",
    "ALTER INDEX webhookevent_call_idx RENAME TO callops_webhookevent_call_control_id_528feb20",
    f"CREATE INDEX callops_webhookevent_call_control_id_528feb20_like ON {TABLE}"
    " (call_control_id varchar_pattern_ops)",
]


class RenameOnPostgresql(migrations.SeparateDatabaseAndState):
    """``operations`` for the state and for other databases; SQL statements on PostgreSQL."""

    def __init__(self, operations, forwards, backwards):
        super().__init__(database_operations=operations, state_operations=operations)
        self.forwards, self.backwards = forwards, backwards

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        for statement in self.forwards:
            schema_editor.execute(statement)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        for statement in self.backwards:
            schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [
        ("callops", "0006_drain_flag"),
    ]

    operations = [
        RenameOnPostgresql(
            [
                migrations.AlterField(
                    model_name="webhookevent",
                    name="call_control_id",
                    field=models.CharField(blank=True, max_length=255),
                ),
                migrations.AlterField(
                    model_name="webhookevent",
                    name="event_id",
                    field=models.CharField(max_length=100, verbose_name="Telnyx event id"),
                ),
                migrations.AddIndex(
                    model_name="webhookevent",
                    index=models.Index(fields=["call_control_id"], name="webhookevent_call_idx"),
                ),
                migrations.AddConstraint(
                    model_name="webhookevent",
                    constraint=models.UniqueConstraint(
                        fields=("event_id",), name="webhookevent_event_id_uniq"
                    ),
                ),
            ],
            forwards=POSTGRESQL_FORWARDS,
            backwards=POSTGRESQL_BACKWARDS,
        ),
    ]
