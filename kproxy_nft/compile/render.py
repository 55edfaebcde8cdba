"""The one gate between model values and rule text, shared by both compilers.

Every address, CIDR, name and number a compiler writes into `iptables-restore` or `nft -f`
input passes through a function here, which returns it unchanged when it is within its
grammar and raises `UnsafeValue` otherwise; free text (iptables comments) goes through
`quote`. `kproxy_nft.validation` refuses bad objects first; this is the second layer, so that
rule injection takes two bugs. Both layers exist because single checks failed before:
`ipaddress` accepts an IPv6 zone (`fe80::1%<anything>`, newlines included) and
`re.match(...$)` lets `"web\\n"` through.

The grammars are precompiled regexes matched with `fullmatch` (`$` allows a final newline),
spelled with ASCII classes (`\\d` also matches other scripts' digits). They must be cheap: a
cold compile of 10,000 services checks 100,000 endpoint addresses, where `ipaddress` would
cost twenty times the regex. They are narrower than `ipaddress` (no zone, no netmask-style
prefix), so whatever passes here parses there. `service_port`, `endpoints` and `node` apply
them to every model field that reaches rule text, so each compiler calls those at its entry
points instead of listing fields itself.

Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable

from kproxy_nft.model import Endpoint, NodeContext, Protocol, ServicePort

SHOWN = 60  # characters of a refused value's repr() in the error message


class UnsafeValue(ValueError):
    """A value outside the grammar of the place it would take in rule text."""


def _refused(what: str, value: object) -> UnsafeValue:
    text = repr(value)
    return UnsafeValue(f"unsafe {what} refused: {text if len(text) <= SHOWN else text[: SHOWN - 1] + '…'}")


# Addresses: RFC 3986's IPv4address / IPv6address (RFC 4291 text forms, embedded IPv4 included).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H16 = r"(?:[0-9a-fA-F]{1,4}+)"  # possessive: a group never gives back digits (no backtracking)
_LS32 = rf"(?:{_H16}:{_H16}|{_IPV4})"
_IPV6 = "|".join((
    rf"(?:{_H16}:){{6}}{_LS32}",
    rf"::(?:{_H16}:){{0,5}}{_LS32}",
    rf"{_H16}::(?:{_H16}:){{0,4}}{_LS32}",
    rf"{_H16}:{_H16}::(?:{_H16}:){{0,3}}{_LS32}",
    rf"(?:{_H16}:){{2}}{_H16}::(?:{_H16}:){{0,2}}{_LS32}",
    rf"(?:{_H16}:){{3}}{_H16}::(?:{_H16}:)?{_LS32}",
    rf"(?:{_H16}:){{4}}{_H16}::{_LS32}",
    rf"(?:{_H16}:){{0,5}}{_H16}::{_H16}",
    rf"(?:{_H16}:){{0,6}}{_H16}::",
    rf"::{_H16}?",
))
_ADDRESS = re.compile(rf"{_IPV4}|{_IPV6}").fullmatch
# Prefix lengths of CIDRs, by family (is it IPv6?).
_PREFIX_LENGTH = {
    False: re.compile(r"3[0-2]|[12]?[0-9]").fullmatch,
    True: re.compile(r"12[0-8]|1[01][0-9]|[1-9]?[0-9]").fullmatch,
}
# Namespace, service and port names: DNS-1123 labels (port names, IANA service names, are a
# subset). They are joined with `/` and `:` into nft chain names and rule comments.
_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_NAME = re.compile(_LABEL).fullmatch
_INTERFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}").fullmatch  # IFNAMSIZ: 16 with the NUL
# The three as one text, `namespace/name/port` (the port name may be empty): one match on the
# hot path instead of three. It matches exactly when each part is a label, as no label has a `/`.
_SERVICE_PORT_NAME = re.compile(rf"{_LABEL}/{_LABEL}/(?:{_LABEL})?").fullmatch
# What iptables-restore reads as one plain argument; other printable ASCII is double-quoted.
_PLAIN_ARGUMENT = re.compile(r"[A-Za-z0-9_./:,=-]+").fullmatch
_PRINTABLE = re.compile(r"[ -~]*").fullmatch


def address(text: str, what: str = "IP address") -> str:
    """An IPv4 or IPv6 address in plain text (no zone, no brackets, no spaces), unchanged."""
    if _ADDRESS(text) is None:
        raise _refused(what, text)
    return text


def cidr(text: str, what: str = "CIDR") -> str:
    """An address and a `/prefix-length` in range for its family, unchanged.

    A bare address is a host, as `ipaddress.ip_network` and iptables read it (`--cluster-cidr`
    takes one); a netmask-style prefix (`/255.0.0.0`) is refused.
    """
    ip, slash, length = text.partition("/")
    if _ADDRESS(ip) is None or (slash and _PREFIX_LENGTH[":" in ip](length) is None):
        raise _refused(what, text)
    return text


def name(text: str, what: str = "name") -> str:
    """A DNS-1123 label (namespace, service or port name: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, ≤ 63)."""
    if _NAME(text) is None:
        raise _refused(what, text)
    return text


def interface(text: str, what: str = "interface name") -> str:
    """A network interface name (or name prefix): at most 15 characters of `[A-Za-z0-9_.-]`."""
    if _INTERFACE(text) is None:
        raise _refused(what, text)
    return text


def number(value: int, what: str = "number") -> int:
    """An int (not a bool, not text that looks like one): its decimal spelling is all it adds."""
    if type(value) is not int:
        raise _refused(what, value)
    return value


def quote(text: str) -> str:
    """Quote an argument for iptables-restore's tokenizer, as iptables-save would.

    Names in comments have passed `name`, but quoting does not rely on it: anything but plain
    safe characters is double-quoted with `"` and `\\` escaped. Control and non-ASCII
    characters are refused: a newline would end the line inside the quotes.
    """
    if _PLAIN_ARGUMENT(text):
        return text
    if _PRINTABLE(text) is None:
        raise _refused("argument", text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------------------------
# the model fields that reach rule text
# ---------------------------------------------------------------------------------------------


def service_port(svc: ServicePort) -> ServicePort:
    """The service port unchanged, if every name, address, range and number of it is safe.

    Its target port, type and traffic distribution never reach rule text.
    """
    spn = svc.name
    if _SERVICE_PORT_NAME(f"{spn.namespace}/{spn.name}/{spn.port}") is None:  # find which, to say so
        name(spn.namespace, "namespace")
        name(spn.name, "service name")
        name(spn.port, "port name")
    if type(spn.protocol) is not Protocol:  # nft spells it with `.lower()`, which a str has too
        raise _refused("protocol", spn.protocol)
    number(svc.port, "port")
    if svc.node_port is not None:
        number(svc.node_port, "node port")
    if svc.health_check_node_port is not None:
        number(svc.health_check_node_port, "health check node port")
    if svc.session_affinity_seconds is not None:
        number(svc.session_affinity_seconds, "session affinity timeout")
    _each(address, "cluster IP", svc.cluster_ips)
    _each(address, "external IP", svc.external_ips)
    _each(address, "load-balancer IP", svc.load_balancer_ips)
    _each(cidr, "load-balancer source range", svc.load_balancer_source_ranges)
    return svc


def _each(check: Callable[[str, str], str], what: str, values: Iterable[str]) -> None:
    for value in values:
        check(value, what)


def endpoints(eps: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    """The endpoints unchanged, if every address and port is safe (inlined: the hot path).

    Node names, zones and hints only select endpoints; they never reach rule text.
    """
    for ep in eps:
        if _ADDRESS(ep.ip) is None:
            raise _refused("endpoint IP", ep.ip)
        if type(ep.port) is not int:
            raise _refused("endpoint port", ep.port)
    return eps


@functools.lru_cache(maxsize=16)
def node(ctx: NodeContext) -> NodeContext:
    """The node context unchanged, if every address and CIDR in it is safe (checked once per node).

    Its hostname and zone only select endpoints; they never reach rule text.
    """
    _each(address, "node IP", ctx.node_ips)
    _each(address, "local address", ctx.local_addresses)
    _each(cidr, "cluster CIDR", ctx.cluster_cidrs)
    _each(cidr, "service CIDR", ctx.service_cidrs)
    _each(cidr, "node-port address", (text for text in ctx.nodeport_addresses if text != "primary"))
    _each(cidr, "pod CIDR", ctx.pod_cidrs)
    _each(interface, "pod bridge interface", (ctx.pod_bridge_interface,) if ctx.pod_bridge_interface else ())
    _each(interface, "pod interface name prefix",
          (ctx.pod_interface_name_prefix,) if ctx.pod_interface_name_prefix else ())
    number(ctx.masquerade_bit, "masquerade bit")
    return ctx
