"""What the demo's partner stand-ins share: the demo partner's API key, kept by ``demo_setup``
in ``var/``, and a call to the partner API as a partner's own backend would make it.

Not a command (Django skips modules whose name starts with ``_``).
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from pathlib import Path

from django.conf import settings
from django.core.management.base import CommandError


def demo_key_file() -> Path:
    return Path(settings.VAR_DIR) / "demo_partner_key"


def shown(path: Path) -> str:
    """A path as the person who ran the command from the checkout would type it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def demo_key() -> str:
    key_file = demo_key_file()
    if not key_file.is_file():
        raise CommandError(f"{key_file} is missing: run manage.py demo_setup first")
    return key_file.read_text().strip()


def api_call(api: str, key: str, method: str, path: str, body: dict | None = None):
    """One request to the partner API; the decoded answer (None for an empty one). POSTs carry
    a fresh ``Idempotency-Key``. Raises ``urllib.error.URLError`` / ``OSError`` / ``ValueError``."""
    headers = {"Authorization": f"Bearer {key}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if method == "POST":
        headers["Idempotency-Key"] = secrets.token_hex(16)
    request = urllib.request.Request(  # noqa: S310 - our own API, http(s) only
        api.rstrip("/") + "/" + path.lstrip("/"), data=data, headers=headers, method=method
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        raw = response.read()
    return json.loads(raw) if raw else None
