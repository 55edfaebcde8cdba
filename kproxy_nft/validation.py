"""The API server's validation rules for every field the proxy reads, in one place.

A node agent trusts what the API server admitted; manifests given to `dump`, `apply` or
`run --manifests` were never admitted by anyone. So every field that reaches the rules is
checked here the way `kubernetes/kubernetes` checks it, and a value the API server would
refuse is an `InvalidObject` naming the field path (`spec.ports[1].port`).

Sources of the rules (kubernetes/kubernetes, `pkg/apis/core/validation/validation.go` unless
noted; `apimachinery` is `k8s.io/apimachinery/pkg/util/validation`):

* names: `ValidateServiceName` (DNS-1035 label), `ValidateNamespaceName` (DNS-1123 label),
  EndpointSlice and ServiceCIDR names (DNS-1123 subdomain), port names (DNS-1123 label),
  `targetPort` names (`IsValidPortName`: IANA service name), `nodeName` (`ValidateNodeName`,
  DNS-1123 subdomain), zones and other label values (`IsValidLabelValue`). Patterns are
  matched with `fullmatch`: `re.match(...$)` would let `"web\\n"` through;
* IPs: `IsValidIP` — a plain address, no IPv6 zone (`fe80::1%eth0`), canonical spelling
  (Kubernetes 1.33's strict parsing also refuses IPv4-mapped IPv6); `ValidateNonSpecialIP`
  (used for endpoint addresses and externalIPs): not unspecified, loopback, link-local or
  link-local multicast;
* CIDRs: `IsValidCIDR` for ServiceCIDRs (`pkg/apis/networking/validation`), the looser
  `loadBalancerSourceRanges` parsing (surrounding whitespace allowed, host bits allowed);
* ports 1–65535 (`IsValidPortNum`), protocols TCP/UDP/SCTP, no two ports of a Service with the
  same port and protocol or the same node port and protocol ("Duplicate value"), unique port
  names (`pkg/apis/discovery/validation` for slices: unique by name alone);
* `healthCheckNodePort`, `sessionAffinityConfig`, traffic policies, `trafficDistribution`,
  topology hints (at most 8 zones or nodes, `pkg/apis/discovery/validation`).

Deliberately stricter than the API server, because these addresses would capture the node's
own traffic: a cluster IP or load-balancer ingress IP that is unspecified, loopback,
link-local, multicast or the IPv4 broadcast address is refused too (the API's allocator never
hands such a cluster IP out; a load-balancer controller has no reason to report one).

Error messages show values with `shown` (quoted, escaped, cut), so an error is one bounded line
whatever the input holds. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Sequence
from functools import lru_cache
from typing import Any

# apimachinery's patterns (IsDNS1123Label, IsDNS1035Label, IsDNS1123Subdomain, IsValidLabelValue).
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")  # plus: a letter, no "--" (IsValidPortName)
_HAS_LETTER = re.compile(r"[a-z]")

MAX_PORT = 65535
MAX_TOPOLOGY_HINTS = 8  # discovery validation: maxHints
MAX_SHOWN = 80  # characters of a value shown in an error message


class InvalidObject(ValueError):
    """An object the API server would refuse; `field` is a path like `spec.ports[0].port`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """A value as an error message shows it: quoted and escaped (one line), cut to `limit`."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[: limit - 1]}…{size}"


def check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidObject(field, message)


def one_of(value: object, allowed: Collection[object], field: str, listed: str = "") -> None:
    """An enumerated field: `value` must be one of `allowed` (`listed`: how the message names them).

    The message is built only on failure: these checks run for every object of a cluster.
    """
    if value not in allowed:
        raise InvalidObject(field, f"unsupported value {shown(value)}" + (f" ({listed})" if listed else ""))


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------


def name(value: object, field: str, pattern: re.Pattern[str], what: str, max_len: int) -> str:
    """A required name that must fully match `pattern` and be at most `max_len` characters."""
    if type(value) is str and 0 < len(value) <= max_len and pattern.fullmatch(value) is not None:
        return value  # the common case, without building the messages below (~1 µs each, millions per cluster)
    check(value not in (None, ""), field, "required value")
    check(isinstance(value, str), field, f"must be a string, got {shown(value)}")
    assert isinstance(value, str)
    check(len(value) <= max_len, field, f"must be no more than {max_len} characters, got {shown(value)}")
    check(pattern.fullmatch(value) is not None, field, f"{shown(value)} is not a valid {what}")
    return value


def optional_name(value: object, field: str, pattern: re.Pattern[str], what: str, max_len: int) -> str | None:
    return None if value in (None, "") else name(value, field, pattern, what, max_len)


def label_value(value: object, field: str) -> str | None:
    """A label value (zones): at most 63 characters of `[A-Za-z0-9._-]`, alphanumeric ends."""
    return optional_name(value, field, LABEL_VALUE, "label value", 63)


def port_name_or_number(value: object, field: str) -> int | str:
    """A `targetPort`: a port number, or an IANA service name (`IsValidPortName`)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():  # not '²': isdigit() alone takes it
        check(len(value) <= 5, field, f"must be between 1 and {MAX_PORT}, inclusive, got {shown(value)}")
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return port(value, field)
    check(isinstance(value, str), field, f"must be a port number or name, got {shown(value)}")
    assert isinstance(value, str)
    check(
        len(value) <= 15 and _IANA_SVC_NAME.fullmatch(value) is not None and "--" not in value
        and _HAS_LETTER.search(value) is not None,
        field,
        f"{shown(value)} is not a valid port number or IANA service name",
    )
    return value


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------


def port(value: object, field: str) -> int:
    """A required port number, 1–65535 (`IsValidPortNum`)."""
    if type(value) is int and 1 <= value <= MAX_PORT:
        return value  # the common case, without building the messages below
    check(value is not None, field, "required value")
    check(isinstance(value, int) and not isinstance(value, bool), field, f"must be an integer, got {shown(value)}")
    assert isinstance(value, int)
    check(1 <= value <= MAX_PORT, field, f"must be between 1 and {MAX_PORT}, inclusive, got {shown(value)}")
    return value


def duplicates(items: Sequence[tuple[object, ...] | None], field: str, what: str) -> None:
    """Refuse a repeated key (the API server's "Duplicate value") at the first repeat."""
    if len(items) < 2:
        return  # most objects have one port: nothing can repeat
    seen: set[tuple[object, ...]] = set()
    for i, item in enumerate(items):
        if item is None:
            continue
        check(item not in seen, field.format(i=i), f"duplicate {what} {'/'.join(str(x) for x in item)}")
        seen.add(item)


# ---------------------------------------------------------------------------------------------
# addresses
# ---------------------------------------------------------------------------------------------


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(value: object, field: str) -> IPAddress:
    """`IsValidIP`: a plain IPv4 or IPv6 address in canonical form, without a zone."""
    check(isinstance(value, str) and bool(value), field, f"must be a valid IP address, got {shown(value)}")
    assert isinstance(value, str)
    # A zone (`fe80::1%eth0`) is accepted by `ipaddress` and carries arbitrary text: refuse it
    # before parsing, so nothing after a `%` can ever reach rule text.
    check("%" not in value, field, f"{shown(value)} must not have an IPv6 zone")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidObject(field, f"{shown(value)} is not a valid IP address") from None
    check(ip.version == 4 or ip.ipv4_mapped is None, field, f"{shown(value)} must not be an IPv4-mapped IPv6 address")
    # The API server insists on the canonical spelling (no leading zeros, compressed IPv6).
    check(str(ip) == value, field, f"{shown(value)} must be written canonically as {str(ip)!r}")
    return ip


def _is_link_local_multicast(ip: IPAddress) -> bool:
    """Go's `IsLinkLocalMulticast`: 224.0.0.0/24, or ff02::/16 (any ffX2:: scope 2)."""
    if ip.version == 4:
        return ip.packed[:3] == b"\xe0\x00\x00"
    return ip.packed[0] == 0xFF and ip.packed[1] & 0x0F == 0x02


# A canonical dotted quad (no leading zeros): `ipaddress` parses exactly these to themselves.
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
# First octets of the special ranges: 0.0.0.0, 127/8 (loopback), 169.254/16 (link-local) and
# 224 and up (multicast, with 224.0.0/24 link-local multicast; 255.255.255.255): looked at closely.
_PLAIN_FIRST_OCTETS = frozenset(range(1, 224)) - {127, 169}


def _plain_ipv4(value: object) -> bool:
    """An ordinary IPv4 address spelled canonically: every address rule holds without `ipaddress`.

    At 100,000 endpoints `ipaddress.ip_address` was most of the reading time (issue 14).
    """
    if type(value) is not str:
        return False
    match = _CANONICAL_IPV4.fullmatch(value)
    return match is not None and int(match.group(1)) in _PLAIN_FIRST_OCTETS


def plain_ipv4s(values: Iterable[object]) -> bool:
    """Whether every one of `values` is an ordinary canonical IPv4 address (`_plain_ipv4`): then
    `non_special_ip` accepts each as it is, and a caller may skip building field names for it."""
    return all(map(_plain_ipv4, values))


def non_special_ip(value: object, field: str) -> str:
    """`ValidateNonSpecialIP`: endpoint addresses and externalIPs."""
    if _plain_ipv4(value):
        assert isinstance(value, str)
        return value
    if type(value) is not str:
        return _non_special_ip(value, field)
    try:
        return _non_special_ip_text(value)
    except InvalidObject as e:
        raise InvalidObject(field, e.message) from None


def _non_special_ip(value: object, field: str) -> str:
    ip = parse_ip(value, field)
    check(not ip.is_unspecified, field, f"may not be unspecified ({ip})")
    check(not ip.is_loopback, field, "may not be in the loopback range (127.0.0.0/8, ::1/128)")
    check(not ip.is_link_local, field, "may not be in the link-local range (169.254.0.0/16, fe80::/10)")
    check(not _is_link_local_multicast(ip), field, "may not be in the link-local multicast range "
          "(224.0.0.0/24, ff02::/10)")
    return str(ip)


# Other addresses (IPv6, special ranges) are parsed once per distinct text; only valid ones are
# kept (lru_cache does not cache a raised InvalidObject), with the field put back by the caller.
_non_special_ip_text = lru_cache(maxsize=65536)(lambda value: _non_special_ip(value, ""))


def service_ip(value: object, field: str) -> str:
    """A cluster IP or load-balancer ingress IP: non-special, and no multicast or broadcast."""
    if _plain_ipv4(value):
        assert isinstance(value, str)
        return value
    non_special_ip(value, field)
    ip = ipaddress.ip_address(str(value))
    check(not ip.is_multicast, field, "may not be a multicast address")
    check(ip != ipaddress.IPv4Address("255.255.255.255"), field, "may not be the broadcast address")
    return str(ip)


def cidr(value: object, field: str, strict: bool = False) -> str:
    """A CIDR. `strict` (`IsValidCIDR`): canonical and no host bits, as ServiceCIDRs must be."""
    check(isinstance(value, str) and bool(value), field, f"must be a valid CIDR, got {shown(value)}")
    assert isinstance(value, str)
    check("%" not in value, field, f"{shown(value)} must not have an IPv6 zone")
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise InvalidObject(field, f"{shown(value)} is not a valid CIDR (e.g. 10.0.0.0/16 or fd00::/108)") from None
    check("/" in value, field, f"{shown(value)} is not a valid CIDR: no prefix length")
    if strict:
        check(str(network) == value, field, f"{shown(value)} must be written canonically as {str(network)!r}")
        return value
    # Host bits stay (they are harmless in a match); the address is spelled canonically.
    address = value.split("/", 1)[0]
    return f"{ipaddress.ip_address(address)}/{network.prefixlen}"


def ip_list(values: Any, field: str, each: Any = non_special_ip) -> tuple[str, ...]:
    """A list of addresses, each checked with `each` (`field` is formatted with the index)."""
    if values is None:
        return ()
    check(isinstance(values, list | tuple), field.split("[")[0], "must be a list")
    return tuple(each(v, field.format(i=i)) for i, v in enumerate(values))
