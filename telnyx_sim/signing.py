"""Telnyx's webhook signature, made the way Telnyx makes it (TELNYX.md section 1).

The one signer of the project's Telnyx stand-ins: the call simulator, the tests and the
benchmarks all sign with `Signer`. It is deliberately not callops' verifier run backwards, so a
test that passes proves callops accepts what Telnyx sends.
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from nacl.signing import SigningKey

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "Signer", "load_signing_key", "wsgi_name"]

SIGNATURE_HEADER = "telnyx-signature-ed25519"
TIMESTAMP_HEADER = "telnyx-timestamp"


def wsgi_name(header: str) -> str:
    """A header as a WSGI environ keys it: ``telnyx-timestamp`` -> ``HTTP_TELNYX_TIMESTAMP``."""
    return "HTTP_" + header.upper().replace("-", "_")


@dataclass(frozen=True)
class Signer:
    """Signs webhook bodies with one Ed25519 key (a fresh one unless given)."""

    key: SigningKey = field(default_factory=SigningKey.generate)

    @property
    def public_key(self) -> str:
        """Base64 of the raw 32-byte verify key, as Telnyx's portal shows it."""
        return base64.b64encode(bytes(self.key.verify_key)).decode()

    def sign(self, body: bytes, timestamp: int | None = None) -> tuple[str, str]:
        """(signature, timestamp): base64 Ed25519 over ``b"<timestamp>|<body>"``, now by default."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        signature = self.key.sign(ts.encode() + b"|" + body).signature
        return base64.b64encode(signature).decode(), ts

    def headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The two signature headers Telnyx sends with ``body``."""
        signature, ts = self.sign(body, timestamp)
        return {SIGNATURE_HEADER: signature, TIMESTAMP_HEADER: ts}

    def wsgi_headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The same headers keyed as a WSGI environ (what Django's test client takes)."""
        signature, ts = self.sign(body, timestamp)
        return {wsgi_name(SIGNATURE_HEADER): signature, wsgi_name(TIMESTAMP_HEADER): ts}

    def write_public_key(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.public_key + "\n")
        return path


def load_signing_key(path: str | os.PathLike[str], *, create: bool = True) -> SigningKey:
    """Read an Ed25519 seed (base64) from ``path``, or make one and save it there (mode 0600).

    Keeping the key across runs keeps the public key callops was configured with valid.
    """
    path = Path(path)
    if path.exists():
        return SigningKey(base64.b64decode(path.read_text().strip(), validate=True))
    if not create:
        raise FileNotFoundError(path)
    key = SigningKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(bytes(key)).decode() + "\n")
    return key
