"""Where the gateway may send requests of its own (webhooks): public addresses only, unless the
operator allows private ones. Guards against server-side request forgery: a caller naming an
internal address (a cloud metadata endpoint, a database, this machine) as its webhook.

`check_webhook_url` reads only the URL (no DNS: admission stays fast); the dispatcher resolves
the host at delivery and checks every address with `is_public` before it connects.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from services.common.errors import InvalidArgument

MAX_URL_CHARS = 2048
# The 6to4 and NAT64 prefixes carry an IPv4 address that is where the packets end up.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def check_webhook_url(url: str, allow_private: bool, field: str = "webhook.url") -> str:
    """`url` if it may be a webhook: http(s), a host, no user info, no whitespace or control
    characters, at most MAX_URL_CHARS; a host that is a non-public IP literal (in any spelling
    `inet_aton` reads, e.g. `2130706433`) or a localhost name only with `allow_private`."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidArgument.one(field, f"at most {MAX_URL_CHARS} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise InvalidArgument.one(field, "no spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidArgument.one(field, "not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument.one(field, "an http or https URL")
    if "@" in parts.netloc:
        raise InvalidArgument.one(field, "no user name or password in the URL")
    host = (parts.hostname or "").rstrip(".")
    if not host or port == 0:
        raise InvalidArgument.one(field, "needs a host (and a port above 0, if one is given)")
    if not allow_private:
        refused = refusal_for(host)
        if refused:
            raise InvalidArgument.one(field, refused)
    return url


def is_public(address: IPAddress) -> bool:
    """Whether `address` is on the public internet: not loopback, private, link-local, shared
    (100.64/10), multicast, reserved or unspecified, nor an IPv6 form of such an IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
        if address.is_site_local or address.teredo is not None:
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def ip_literal(host: str) -> IPAddress | None:
    """The address `host` spells, if it is an IP literal; IPv4 in any form `inet_aton` takes
    (`0x7f.1`, `2130706433`, `017700000001`), since resolvers read those as addresses too."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, UnicodeError, ValueError):
        return None


def refusal_for(host: str) -> str:
    """Why a webhook may not go to `host` (not resolved), or "" when it may."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return "localhost names this machine; webhooks go to public addresses only"
    address = ip_literal(host)
    if address is not None and not is_public(address):
        return f"{address} is not a public address; webhooks go to public addresses only"
    return ""
