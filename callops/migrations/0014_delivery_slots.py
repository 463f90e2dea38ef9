"""Per-endpoint concurrency: a delivery's place in its endpoint's queue, and the two partial
indexes that count an endpoint's requests in flight and find its next waiter."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("callops", "0013_partner_webhooks"),
    ]

    operations = [
        migrations.AddField(
            model_name="delivery",
            name="waiting_since",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddIndex(
            model_name="delivery",
            index=models.Index(
                condition=models.Q(("status", "delivering")),
                fields=["endpoint", "next_attempt_at"],
                name="delivery_in_flight_idx",
            ),
        ),
        migrations.AddIndex(
            model_name="delivery",
            index=models.Index(
                condition=models.Q(("waiting_since__isnull", False)),
                fields=["endpoint", "waiting_since"],
                name="delivery_waiting_idx",
            ),
        ),
    ]
