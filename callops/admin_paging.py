"""Admin lists that open fast on tables of millions of rows.

Django's changelist counts the whole result to paginate it (and, when filtered, the whole
table again for "N of M"). On PostgreSQL a ``count(*)`` reads every row: seconds on a
ten-million-row ``webhookevent``. Here the count stops at ``CALLOPS_ADMIN_COUNT_LIMIT`` rows
(a ``LIMIT`` in a subquery, which an index or a time filter keeps short) and the list says
"more than N" beyond it; an unfiltered list of a big table takes the planner's row estimate
(``pg_class.reltuples``, kept by autovacuum), as ``psql``'s ``\\dt+`` does.
"""

from __future__ import annotations

from django.conf import settings
from django.core.paginator import Paginator
from django.db import connections
from django.utils.functional import cached_property


class BoundedCountPaginator(Paginator):
    count_note = ""  # what the list says instead of an exact count ("about N", "more than N")

    @cached_property
    def count(self) -> int:
        limit = settings.CALLOPS_ADMIN_COUNT_LIMIT
        queryset = self.object_list
        if not queryset.query.where:
            estimate = _estimated_rows(queryset.model, queryset.db)
            if estimate is not None and estimate > limit:
                self.count_note = f"about {estimate:,}"
                return estimate
        count = queryset[: limit + 1].count()
        if count > limit:
            self.count_note = f"more than {limit:,}"
        return count


def _estimated_rows(model, alias: str) -> int | None:
    """The planner's row count of ``model``'s table; None off PostgreSQL or before it has one."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)",
            [connection.ops.quote_name(model._meta.db_table)],
        )
        row = cursor.fetchone()
    return row[0] if row and row[0] >= 0 else None


class LargeList:
    """For a ModelAdmin whose table grows without bound: a bounded count, no second count."""

    paginator = BoundedCountPaginator
    show_full_result_count = False
