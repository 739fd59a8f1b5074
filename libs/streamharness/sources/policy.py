"""Which URLs a puller may open: the scheme, and every address the host resolves to.

A source URL comes from a tenant, and ingest opens it from inside the cluster: without this check
a URL could read the cloud's metadata endpoint (169.254.169.254), a pod on the cluster network or
a service on the node's loopback. :func:`check_url` refuses a scheme outside
``SH_SOURCE_ALLOWED_SCHEMES`` (INVALID_ARGUMENT) and a host any of whose addresses is in a
forbidden network (PERMISSION_DENIED): loopback, RFC 1918, link-local, carrier-grade NAT, unique
local, multicast, reserved, unspecified, and IPv6 forms that embed such an IPv4 address (mapped,
NAT64, 6to4) — unless ``SH_SOURCE_ALLOW_PRIVATE_NETWORKS`` or ``SH_SOURCE_ALLOWED_NETWORKS`` says
otherwise. ``SH_SOURCE_DENIED_NETWORKS`` is refused always.

The check runs before every connection attempt (a reconnect resolves the name again: a DNS
answer that changes to a private address — DNS rebinding — is caught at the next reconnect), and
on every HTTP redirect hop and HLS playlist/segment URL (:mod:`streamharness.sources.http_io`).
What it cannot close is the moment between the check and FFmpeg's own resolution of the same name
for RTSP and RTMP; a NetworkPolicy that denies the ingest pods egress to private ranges is the
complete answer, and docs/operations.md says so.

A host that does not resolve is INVALID_ARGUMENT (the name does not exist: retrying will not help);
a DNS server that does not answer right now (``EAI_AGAIN``) is UNAVAILABLE, which a puller retries.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from streamharness.errors import DependencyUnavailable, InvalidInput, PermissionDenied

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[..., Sequence[tuple]]

DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "rtmp": 1935, "rtmps": 443, "http": 80, "https": 443}

# The address classes refused unless allowed, most specific first (the first match names the class).
_FORBIDDEN: tuple[tuple[str, str], ...] = (
    ("169.254.169.254/32", "a link-local address (the cloud metadata endpoint)"),
    ("0.0.0.0/8", "an unspecified address ('this network')"),
    ("10.0.0.0/8", "a private address (RFC 1918)"),
    ("100.64.0.0/10", "a carrier-grade NAT address (RFC 6598)"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address (RFC 1918)"),
    ("192.0.0.0/24", "a reserved address (IETF protocol assignments)"),
    ("192.168.0.0/16", "a private address (RFC 1918)"),
    ("198.18.0.0/15", "a reserved address (benchmarking)"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address (incl. broadcast)"),
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address (deprecated)"),
    ("fc00::/7", "a unique local address (ULA)"),
    ("ff00::/8", "a multicast address"),
)
_FORBIDDEN_NETS: tuple[tuple[IPNetwork, str], ...] = tuple((ipaddress.ip_network(n), what) for n, what in _FORBIDDEN)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPAT = ipaddress.ip_network("::/96")
# A URL FFmpeg and Python could read differently (a parser differential) is refused outright.
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_SECRET_QUERY = re.compile(r"token|key|sig|pass|secret|auth|cred", re.IGNORECASE)


def parse_networks(value: str, variable: str) -> tuple[IPNetwork, ...]:
    """A comma-separated CIDR list; ValueError naming ``variable`` on a bad entry."""
    nets = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError as err:
            raise ValueError(f"{variable}: {part!r} is not a network in CIDR form ({err})") from None
    return tuple(nets)


def redact(url: str) -> str:
    """``url`` without its user name and password, and with the values of query parameters that
    look like credentials (token, key, signature, password, auth...) replaced by ``***``: what may
    go into logs, statuses and errors."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        # Unparseable: keep the scheme, drop everything after it that could hold a secret.
        scheme, sep, _ = url.partition("://")
        return f"{scheme}://…" if sep else "…"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY.search(k) for k, _ in pairs):
            query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def classify(address: IPAddress) -> str | None:
    """The forbidden class ``address`` is in ("a loopback address", ...), or None for a
    public address. IPv6 addresses that carry an IPv4 address (mapped, NAT64, 6to4, compatible)
    are judged by that IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_v4(address)
        if embedded is not None:
            what = classify(embedded)
            return f"{what}, as {embedded} inside an IPv6 address" if what else None
    for net, what in _FORBIDDEN_NETS:
        if address.version == net.version and address in net:
            return what
    return None


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _V4_COMPAT and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _in(address: IPAddress, nets: tuple[IPNetwork, ...]) -> IPNetwork | None:
    candidates = [address]
    if isinstance(address, ipaddress.IPv6Address) and (v4 := _embedded_v4(address)) is not None:
        candidates.append(v4)
    for net in nets:
        for candidate in candidates:
            if candidate.version == net.version and candidate in net:
                return net
    return None


def check_address(address: IPAddress, host: str, settings) -> None:
    """PermissionDenied if ``settings`` forbid connecting to ``address`` (which ``host`` resolved to)."""
    denied = _in(address, parse_networks(settings.denied_networks, "SH_SOURCE_DENIED_NETWORKS"))
    if denied is not None:
        raise PermissionDenied(f"source host {host!r} resolves to {address}, in {denied} of SH_SOURCE_DENIED_NETWORKS: "
                               "pulling from it is refused")
    what = classify(address)
    if what is None or settings.allow_private_networks:
        return
    if _in(address, parse_networks(settings.allowed_networks, "SH_SOURCE_ALLOWED_NETWORKS")) is not None:
        return
    shown = host if host == str(address) else f"{host!r} resolves to {address}, which"
    raise PermissionDenied(f"source host {shown} is {what}: pulling from it is refused (set "
                           "SH_SOURCE_ALLOW_PRIVATE_NETWORKS=true, or add its network to SH_SOURCE_ALLOWED_NETWORKS)")


def resolve(host: str, port: int, resolver: Resolver = socket.getaddrinfo) -> list[IPAddress]:
    """Every address ``host`` resolves to. InvalidInput when the name does not exist,
    DependencyUnavailable when DNS does not answer right now."""
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        if err.errno == socket.EAI_AGAIN:
            raise DependencyUnavailable(f"cannot resolve the source host {host!r} right now ({err.strerror}); "
                                        "the lookup is retried") from None
        raise InvalidInput(f"cannot resolve the source host {host!r}: {err.strerror or err}") from None
    except (UnicodeError, ValueError) as err:
        raise InvalidInput(f"the source host {host!r} is not a valid host name ({err})") from None
    addresses: list[IPAddress] = []
    for info in infos:
        raw = str(info[4][0]).split("%", 1)[0]  # an IPv6 scope id is not part of the address
        address = ipaddress.ip_address(raw)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InvalidInput(f"the source host {host!r} resolves to no address")
    return addresses


def check_url(url: str, settings, *, resolver: Resolver = socket.getaddrinfo) -> str:
    """Refuse ``url`` unless its scheme is allowed and every address its host resolves to is;
    return it redacted (:func:`redact`). Called before every connection attempt."""
    shown = redact(url)
    if not url:
        raise InvalidInput("the source has no url")
    if _BAD_CHARS.search(url):
        raise InvalidInput(f"the source url {shown} contains a space, a control character or a backslash")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError as err:
        raise InvalidInput(f"the source url {shown} cannot be parsed ({err})") from None
    scheme = parts.scheme.lower()
    allowed = sorted(settings.scheme_set)
    if not scheme:
        raise InvalidInput(f"the source url {shown} has no scheme; use one of {', '.join(allowed)}")
    if scheme not in settings.scheme_set:
        raise InvalidInput(f"source scheme {scheme!r} is not allowed (allowed: {', '.join(allowed)}; "
                           "SH_SOURCE_ALLOWED_SCHEMES)")
    if not host:
        raise InvalidInput(f"the source url {shown} has no host")
    for address in resolve(host, port or DEFAULT_PORTS[scheme], resolver):
        check_address(address, host, settings)
    return shown
