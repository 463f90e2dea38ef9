"""Where a partner may point Telnyx: public hosts only.

A stream URL or fork target is an instruction to Telnyx to open a connection, and callops itself
may connect to it (health checks, the simulator). A partner must not be able to aim either at
loopback, private networks, link-local addresses (cloud metadata lives at 169.254.169.254) or
other special ranges, directly or through a hostname that resolves there.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from django.conf import settings


class UnsafeTarget(ValueError):
    pass


def check_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if not address.is_global or address.is_multicast:
        raise UnsafeTarget(f"{address} is not a public address")


def check_host(host: str) -> None:
    """Every address the host resolves to must be public; a literal IP is checked as it is."""
    if settings.CALLOPS_ALLOW_PRIVATE_TARGETS:
        return
    try:
        check_address(ipaddress.ip_address(host.strip("[]")))
        return
    except ValueError as exc:
        if isinstance(exc, UnsafeTarget):
            raise
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise UnsafeTarget(f"{host} does not resolve") from None
    for info in infos:
        check_address(ipaddress.ip_address(info[4][0].split("%")[0]))


def check_stream_url(url: str) -> None:
    parts = urlsplit(url)
    if not parts.hostname:
        raise UnsafeTarget("the URL names no host")
    check_host(parts.hostname)


def check_udp_target(target: str) -> None:
    host = target.removeprefix("udp:").rsplit(":", 1)[0]
    check_host(host)
