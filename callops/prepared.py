"""Statements of the hot paths, run as prepared statements on Django's PostgreSQL connection:
the webhook's INSERT (``callops.webhooks``), a command's claim and its outcome
(``callops.commands``). Callers keep a portable path for other databases (SQLite).

Django's cursors bind parameters on the client, so PostgreSQL parses and plans such a
statement on every run (measured on the webhook: about half of its server CPU), and each use
builds a new cursor and quotes every parameter in Python. A psycopg cursor with server-side
binding on the same connection prepares a statement once per connection (``prepare_threshold``
in the database OPTIONS; None, ``DATABASE_PREPARED_STATEMENTS=false``, turns preparing off and
the statement still runs). Errors are wrapped as Django's, so callers' error handling and
Django's clean-up of a broken connection work as for any ORM query; the statement runs in
whatever transaction Django has open on the connection. These statements do not appear in
``connection.queries``.
"""

from __future__ import annotations

from typing import Any

import psycopg
from django.db.backends.base.base import BaseDatabaseWrapper


def fetchone(db: BaseDatabaseWrapper, sql: str, params: Any) -> tuple | None:
    """Run ``sql`` prepared on ``db`` (PostgreSQL) and return its first row, if any."""
    db.ensure_connection()
    # One cursor per connection, kept on Django's wrapper: a new cursor would look up the
    # parameters' dumpers again on every run.
    cursor = getattr(db, "_callops_prepared_cursor", None)
    if cursor is None or cursor.closed or cursor.connection is not db.connection:
        cursor = db._callops_prepared_cursor = psycopg.Cursor(db.connection)
    with db.wrap_database_errors:
        cursor.execute(sql, params, prepare=True)
        return cursor.fetchone()
