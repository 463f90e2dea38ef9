"""Where a partner may point Telnyx: public hosts only.

A stream URL or fork target is an instruction to Telnyx to open a connection, and callops itself
may connect to it (health checks, the simulator). A partner must not be able to aim either at
loopback, private networks, link-local addresses (cloud metadata lives at 169.254.169.254) or
other special ranges, directly or through a hostname that resolves there.

The check is only as good as its agreement with whoever connects. callops reads a URL here;
Telnyx and WebSocket clients read it again, most of them the way the WHATWG URL Standard does,
which differs from RFC 3986 (and from ``urllib.parse``) on backslashes, user information,
percent-encoded hosts, non-ASCII characters and numeric hosts such as ``127.1``. No WHATWG
parser is installed, so instead of parsing leniently twice and comparing, ``stream_url_host``
accepts only a strict subset of RFC 3986 on which both standards split out the same host by
construction, and the string that passes is the one stored and sent, unchanged.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from django.conf import settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeTarget(ValueError):
    pass


# --- Addresses ------------------------------------------------------------------------------

# IPv6 ranges whose last 32 bits are an IPv4 address that traffic to them ends up at: they are
# as public as that IPv4 address, whatever Python's ``is_global`` says of the range.
LAST_32_BITS_IPV4 = (
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64, the well-known prefix (RFC 6052)
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped (RFC 4291)
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated, SIIT (RFC 6145)
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible, deprecated (RFC 4291); :: and ::1 too
)
# Translation prefixes whose mapping to IPv4 is each operator's own: nothing tells where they
# lead, so they are never public (Python 3.11 calls them global).
NEVER_PUBLIC = (ipaddress.IPv6Network("64:ff9b:1::/48"),)  # local-use NAT64 (RFC 8215)


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries and delivers to, if it is of such a form."""
    if address.is_loopback or address.is_unspecified:  # ::1 and ::, not IPv4-compatible
        return ()
    for network in LAST_32_BITS_IPV4:
        if address in network:
            return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    if address.sixtofour:  # 2002::/16, the IPv4 in bits 16-48
        return (address.sixtofour,)
    if address.teredo:  # 2001::/32: the Teredo server and the (de-obfuscated) client
        return address.teredo
    return ()


def check_address(address: Address) -> None:
    carried = embedded_ipv4(address) if address.version == 6 else ()
    for judged in carried or (address,):
        if (
            not judged.is_global
            or judged.is_multicast
            or judged.is_reserved
            or any(judged in network for network in NEVER_PUBLIC)
        ):
            leads_to = f" (it leads to {judged})" if judged is not address else ""
            raise UnsafeTarget(f"{address} is not a public address{leads_to}")


def check_host(host: str | Address) -> None:
    """Every address the host resolves to must be public; a literal IP is checked as it is."""
    if settings.CALLOPS_ALLOW_PRIVATE_TARGETS:
        return
    if not isinstance(host, str):
        check_address(host)
        return
    # A name of one label is completed by the resolver's search domains: ours would check
    # one host and Telnyx's would find another.
    if "." not in host:
        raise UnsafeTarget(f"{host} is not a fully qualified name")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise UnsafeTarget(f"{host} does not resolve") from None
    for info in infos:
        check_address(ipaddress.ip_address(info[4][0].split("%")[0]))


# --- Stream URLs ----------------------------------------------------------------------------

# RFC 3986 path and query characters: unreserved, sub-delims, ":", "@", "/", "?" and %XX.
# Everything else (space, quotes, <>, {}, |, ^, `) WHATWG would percent-encode on its own.
PATH_AND_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
AUTHORITY = re.compile(r"(?P<host>\[[^\[\]]*\]|[^\[\]:]*)(?::(?P<port>[0-9]{1,5}))?")
LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# WHATWG parses a host whose last label looks like a number as IPv4 (RFC 3986 as a name, which
# inet_aton would then read as IPv4 anyway): such a host must be a plain dotted quad.
NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def stream_url_host(url: str) -> str | Address:
    """The host of a ``ws://`` or ``wss://`` URL that RFC 3986 and WHATWG read alike: a name
    (lowercased) or an IP address. Anything else raises ``UnsafeTarget`` saying why."""
    if "\\" in url:
        raise UnsafeTarget("must not contain a backslash: URL parsers disagree on what it means")
    if re.search(r"[^\x21-\x7e]", url):
        raise UnsafeTarget(
            "must be printable ASCII without spaces or control characters"
            " (percent-encode the rest; write a non-ASCII host in its xn-- form)"
        )
    parts = re.fullmatch(r"wss?://(?P<authority>[^/?#]*)(?P<rest>.*)", url, re.IGNORECASE)
    if not parts:
        raise UnsafeTarget("must be ws:// or wss:// followed by a host")
    authority, rest = parts["authority"], parts["rest"]
    if "@" in authority:
        raise UnsafeTarget("must not contain user information (an @ before the path)")
    if "%" in authority:
        raise UnsafeTarget("must not percent-encode its host")
    if "#" in rest:
        raise UnsafeTarget("must not have a fragment: a WebSocket URL has none")
    if not PATH_AND_QUERY.fullmatch(rest):
        raise UnsafeTarget("has a character in its path or query that must be percent-encoded")
    where = AUTHORITY.fullmatch(authority)
    if not where or not where["host"]:
        raise UnsafeTarget("must be ws:// or wss:// followed by host[:port]")
    if where["port"] is not None and not 0 < int(where["port"]) < 65536:
        raise UnsafeTarget("port must be between 1 and 65535")
    return _host(where["host"].lower())


def _host(host: str) -> str | Address:
    if host.startswith("["):
        try:
            return ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise UnsafeTarget(f"{host} is not an IPv6 address") from None
    labels = host.split(".")
    if NUMERIC_LABEL.fullmatch(labels[-1]):
        try:
            return ipaddress.IPv4Address(host)
        except ValueError:
            raise UnsafeTarget(f"{host} is not an IPv4 address in dotted-quad form") from None
    if len(host) > 253 or not all(LABEL.fullmatch(label) for label in labels):
        raise UnsafeTarget(f"{host} is not a DNS name (letters, digits and hyphens)")
    return host


def check_stream_url(url: str) -> None:
    check_host(stream_url_host(url))


# --- Fork targets ---------------------------------------------------------------------------


def check_udp_target(target: str) -> None:
    """``udp:<ip>:<port>``, the IP as Telnyx takes it: dotted IPv4, or IPv6 in brackets."""
    host, _, port = target.removeprefix("udp:").rpartition(":")
    try:
        if host.startswith("[") and host.endswith("]"):
            address: Address = ipaddress.IPv6Address(host[1:-1])
        else:
            address = ipaddress.IPv4Address(host)
    except ValueError:
        raise UnsafeTarget("must be udp:<ip>:<port>, an IPv6 address in brackets") from None
    if not (port.isascii() and port.isdigit()):
        raise UnsafeTarget("must be udp:<ip>:<port>")
    check_host(address)
