"""Canonical form of one iptables rule: the text `iptables-save` would print for it.

The compiler writes rules in kube-proxy's argument order (`-m comment --comment … -m tcp -p tcp
-d 10.0.0.1 --dport 80 -j …`); `iptables-save` prints the same rule differently: `-s/-d/-i/-o/-p`
first, `/32` (or `/128`) added, each match's options in the extension's own print order, the
probability of `-m statistic` rewritten to what the kernel stores, defaults spelled out
(`-m recent … --mask 255.255.255.255 --rsource`, `-j REJECT --reject-with icmp-port-unreachable`),
`-j MARK --or-mark X` shown as `--set-xmark X/X`, comments quoted unless plainly alphanumeric.

`canonical(rule, family)` rewrites any spelling into that printed form, so that
`canonical(ours) == canonical(saved)` exactly when the kernel holds our rule, and
`canonical(saved) == saved` for what `iptables-save` prints (both are checked against the kernel
in tests/kernel/test_iptables_apply.py, for the nft and the legacy backend).

How the text is read follows iptables' own parser (libxtables/xshared.c):

* tokens are split on blanks; `"…"` quotes, and inside quotes `\\` escapes the next character
  (a single quote is an ordinary character to iptables-restore);
* an option belongs to the target if the target knows it, else to the most recently loaded
  match that knows it (getopt sees the newest extension's options first); `--dport` without
  `-m tcp` loads the protocol's match implicitly, appended where the option appeared;
* `! --opt` negates the option that follows.

Extensions not described in `MATCHES` / `TARGETS` keep their options in the order written: the
canonical form is then only as good as the caller's spelling. Service names as ports
(`--dport http`), ICMP type names and host names as addresses are left as written (iptables
prints numbers). Pure: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kproxy_nft.model import IPFamily

# ---------------------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------------------

# A quoted run (backslash escapes inside), or a run of anything but blanks and quotes.
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s"]+)')
_UNESCAPE = re.compile(r"\\(.)")


class Token(NamedTuple):
    text: str
    quoted: bool = False  # a quoted token is always a value, even if it starts with "-"


def tokenize(rule: str) -> list[Token]:
    """Split rule text the way iptables-restore does (see the module docstring)."""
    if '"' not in rule:
        return [Token(t) for t in rule.split()]
    tokens: list[Token] = []
    if "\\" not in rule:
        # Without escapes, quotes simply alternate: odd pieces are quoted values.
        for i, piece in enumerate(rule.split('"')):
            if i % 2:
                tokens.append(Token(piece, quoted=True))
            else:
                tokens += [Token(t) for t in piece.split()]
        return tokens
    for m in _TOKEN.finditer(rule):
        quoted_text, bare = m.group(1), m.group(2)
        if bare is not None:
            tokens.append(Token(bare))
        else:
            tokens.append(Token(_UNESCAPE.sub(r"\1", quoted_text), quoted=True))
    return tokens


_SAFE_BARE = re.compile(r"[A-Za-z0-9_\-]+")
_SAFE_RESTORE = re.compile(r"[^\s\"\\']+")


def save_string(value: str) -> str:
    """A string value as iptables-save prints it (libxtables' `xtables_save_string`).

    Bare when made only of letters, digits, `_` and `-`; otherwise double-quoted with `"`, `\\`
    and `'` backslash-escaped.
    """
    if _SAFE_BARE.fullmatch(value):
        return value
    # Not `re.sub` with a `\1` template: in CPython 3.11 each such call leaves small objects
    # behind, and a drift check makes 100,000s of calls; scattered among the check's transient
    # memory they kept ~40 MiB of it resident after every hourly check at 10,000 services.
    return '"' + value.translate(_SAVE_ESCAPES) + '"'


_SAVE_ESCAPES = str.maketrans({'"': '\\"', "\\": "\\\\", "'": "\\'"})


def _word(value: str) -> str:
    """Any other argument: as is when iptables-restore reads it back unchanged, else quoted."""
    return value if _SAFE_RESTORE.fullmatch(value) else save_string(value)



# ---------------------------------------------------------------------------------------------
# the parsed rule
# ---------------------------------------------------------------------------------------------


# Options and modules are NamedTuples rather than frozen dataclasses: a plan against a freshly
# read ruleset canonicalizes every rule, and these are created by the million.
class Option(NamedTuple):
    name: str  # without the leading dashes: "dport", "comment"
    args: tuple[str, ...] = ()
    negated: bool = False


class Module(NamedTuple):
    """One `-m NAME` match or the `-j NAME` target, with its options."""

    name: str
    options: tuple[Option, ...] = ()


@dataclass(frozen=True)
class Rule:
    """A rule split into iptables' three parts; `base` holds (`s d i o p f`, negated, value)."""

    base: tuple[tuple[str, bool, str], ...] = ()
    matches: tuple[Module, ...] = ()
    target: Module | None = None
    goto: bool = False  # `-g CHAIN` rather than `-j`


# The options of the rule itself, in the order iptables-save prints them.
_BASE_ORDER = ("s", "d", "i", "o", "p", "f")
_BASE_ALIASES = {
    "-s": "s", "--source": "s", "--src": "s",
    "-d": "d", "--destination": "d", "--dst": "d",
    "-i": "i", "--in-interface": "i",
    "-o": "o", "--out-interface": "o",
    "-p": "p", "--protocol": "p",
    "-f": "f", "--fragment": "f",
}  # fmt: skip
_MATCH = ("-m", "--match")
_JUMP = ("-j", "--jump")
_GOTO = ("-g", "--goto")
_EXTENSION_FLAGS = frozenset(_MATCH + _JUMP + _GOTO)

# /etc/protocols names iptables prints for protocol numbers (only the ones a proxy meets).
_PROTOCOL_NAMES = {"1": "icmp", "6": "tcp", "17": "udp", "58": "ipv6-icmp", "132": "sctp", "icmpv6": "ipv6-icmp"}


def _ends_args(token: Token) -> bool:
    """Whether a token starts the next option (`-x`, `--xyz`, or the `!` before one)."""
    text = token.text
    return not token.quoted and text[:1] in ("-", "!") and (len(text) > 1 or text == "!")


def parse_rule(rule: str) -> Rule:
    """Split rule text into base options, matches and target, routing options like iptables.

    Total: text iptables would refuse still gives some deterministic result.
    """
    tokens = tokenize(rule)
    parts = _Parts()
    negate = False
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok.text == "!" and not tok.quoted:
            negate = True
            continue
        if tok.text in _BASE_ALIASES and not tok.quoted:
            key = _BASE_ALIASES[tok.text]
            value = ""
            if key != "f" and i < len(tokens):
                value, i = tokens[i].text, i + 1
            parts.base[key] = (negate, value)
        elif tok.text in _EXTENSION_FLAGS and not tok.quoted and i < len(tokens):
            name, i = tokens[i].text, i + 1
            parts.open(name, is_target=tok.text not in _MATCH, goto=tok.text in _GOTO)
        else:
            args: list[str] = []
            while i < len(tokens) and not _ends_args(tokens[i]):
                args.append(tokens[i].text)
                i += 1
            parts.route(Option(tok.text.lstrip("-"), tuple(args), negate))
        negate = False
    return parts.freeze()


class _Parts:
    """The rule being parsed: base options and the extensions loaded so far, in load order."""

    def __init__(self) -> None:
        self.base: dict[str, tuple[bool, str]] = {}
        self.matches: list[tuple[str, list[Option]]] = []
        self.target: tuple[str, list[Option]] | None = None
        self.goto = False
        self.latest: list[Option] | None = None  # the extension loaded last

    def open(self, name: str, is_target: bool, goto: bool) -> None:
        entry: tuple[str, list[Option]] = (name, [])
        if is_target:
            self.target, self.goto = entry, goto
        else:
            self.matches.append(entry)
        self.latest = entry[1]

    def route(self, option: Option) -> None:
        """Give an option to the extension iptables would give it to (see the module docstring)."""
        if self.target is not None and _claims(TARGETS.get(self.target[0]), option.name):
            self.target[1].append(option)
            return
        for name, opts in reversed(self.matches):
            if _claims(MATCHES.get(name), option.name):
                opts.append(option)
                return
        neg, proto = self.base.get("p", (False, ""))
        proto = _PROTOCOL_NAMES.get(proto.lower(), proto.lower())
        if not neg and _claims(MATCHES.get(proto), option.name):
            self.open(proto, is_target=False, goto=False)  # iptables loads the protocol's match here
        elif self.latest is None:
            self.open("", is_target=False, goto=False)  # stray option: keep it, in a nameless group
        # Otherwise an extension we do not describe: the one loaded last takes the option.
        assert self.latest is not None
        self.latest.append(option)

    def freeze(self) -> Rule:
        return Rule(
            base=tuple((k, neg, v) for k, (neg, v) in self.base.items()),
            matches=tuple(Module(n, tuple(opts)) for n, opts in self.matches),
            target=Module(self.target[0], tuple(self.target[1])) if self.target else None,
            goto=self.goto,
        )


def _claims(spec: Spec | None, option: str) -> bool:
    return spec is not None and option in spec.claims


# ---------------------------------------------------------------------------------------------
# extensions: the print order and value spelling of each one iptables-save uses
# ---------------------------------------------------------------------------------------------

Fixer = Callable[[list[Option], IPFamily], list[Option]]


@dataclass(frozen=True)
class Spec:
    """What iptables-save does with one extension's options.

    `order` is the print order (libxt_<name>.c's save function); `aliases` map long or old
    spellings to the printed ones; `fix` rewrites values and adds the defaults it prints.
    """

    order: tuple[str, ...]
    aliases: dict[str, str] = field(default_factory=dict)
    fix: Fixer | None = None
    rank: dict[str, int] = field(init=False, repr=False, compare=False)
    claims: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", {name: i for i, name in enumerate(self.order)})
        object.__setattr__(self, "claims", frozenset(self.order) | frozenset(self.aliases))


def _rewrite(options: list[Option], name: str, fn: Callable[[str], str]) -> list[Option]:
    return [o._replace(args=tuple(fn(a) for a in o.args)) if o.name == name else o for o in options]


def _has(options: list[Option], *names: str) -> bool:
    return any(o.name in names for o in options)


def _ports(value: str) -> str:
    """`080` → `80`, `80:80` → `80`, `0:80` kept: the port ranges iptables prints."""

    def one(p: str) -> str:
        return str(int(p)) if p.isdigit() else p

    lo, sep, hi = value.partition(":")
    if sep and one(lo) == one(hi):
        return one(lo)
    return f"{one(lo)}{sep}{one(hi)}" if sep else one(lo)


def _port_list(value: str) -> str:
    return ",".join(_ports(p) for p in value.split(","))


def _bit_list(names: Sequence[str], aliases: dict[str, Sequence[str]] | None = None) -> Callable[[str], str]:
    """A comma list of flag names printed in the extension's bit order (unknown names last)."""
    order = {n: i for i, n in enumerate(names)}

    def fix(value: str) -> str:
        items: list[str] = []
        for item in value.upper().split(","):
            items += (aliases or {}).get(item, [item])
        unique = dict.fromkeys(items)
        return ",".join(sorted(unique, key=lambda n: order.get(n, len(order))))

    return fix


def _port_fix(options: list[Option], family: IPFamily) -> list[Option]:
    return _rewrite(_rewrite(options, "sport", _ports), "dport", _ports)


_TCP_FLAGS = ("FIN", "SYN", "RST", "PSH", "ACK", "URG")
_tcp_flag_list = _bit_list(_TCP_FLAGS, {"ALL": _TCP_FLAGS, "NONE": ()})


def _tcp_fix(options: list[Option], family: IPFamily) -> list[Option]:
    out = []
    for o in _port_fix(options, family):
        if o.name == "syn":  # --syn is shorthand for this flag test
            o = Option("tcp-flags", ("FIN,SYN,RST,ACK", "SYN"), o.negated)
        if o.name == "tcp-flags":
            o = o._replace(args=tuple((_tcp_flag_list(a) or "NONE") for a in o.args))
        out.append(o)
    return out


def _multiport_fix(options: list[Option], family: IPFamily) -> list[Option]:
    for name in ("sports", "dports", "ports"):
        options = _rewrite(options, name, _port_list)
    return options


def _comment_fix(options: list[Option], family: IPFamily) -> list[Option]:
    return _rewrite(options, "comment", save_string)


_PROBABILITY_SCALE = 0x80000000


def probability_text(value: str) -> str:
    """The probability the kernel holds, as iptables prints it.

    libxt_statistic stores `lround(p * 2^31)` in a u32 and prints that over 2^31 with `%.11f`;
    `lround` rounds halves away from zero (Python's `round` would round them to even).
    """
    try:
        p = float(value)
    except ValueError:
        return value
    stored = math.floor(p * _PROBABILITY_SCALE + 0.5)
    return f"{stored / _PROBABILITY_SCALE:.11f}"


def _statistic_fix(options: list[Option], family: IPFamily) -> list[Option]:
    return _rewrite(options, "probability", probability_text)


def _all_ones(family: IPFamily) -> str:
    return "255.255.255.255" if family is IPFamily.V4 else "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def _recent_fix(options: list[Option], family: IPFamily) -> list[Option]:
    options = _rewrite(options, "mask", lambda m: _address(m, family, with_prefix=False))
    if not _has(options, "name"):
        options.append(Option("name", ("DEFAULT",)))
    if not _has(options, "mask"):
        options.append(Option("mask", (_all_ones(family),)))
    if not _has(options, "rsource", "rdest"):
        options.append(Option("rsource"))
    return options


def _hex(value: str) -> str:
    try:
        return hex(int(value, 0))
    except ValueError:
        return value


def _mark_mask(value: str) -> tuple[int, int | None] | None:
    """`X` or `X/Y` as integers, None when not numbers."""
    mark, sep, mask = value.partition("/")
    try:
        return int(mark, 0), int(mask, 0) if sep else None
    except ValueError:
        return None


def _mark_fix(options: list[Option], family: IPFamily) -> list[Option]:
    def fix(value: str) -> str:
        parsed = _mark_mask(value)
        if parsed is None:
            return value
        mark, mask = parsed
        return hex(mark) if mask in (None, 0xFFFFFFFF) else f"{hex(mark)}/{hex(mask)}"

    return _rewrite(options, "mark", fix)


_CT_STATES = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")
_CT_STATUSES = ("NONE", "EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED")


def _conntrack_fix(options: list[Option], family: IPFamily) -> list[Option]:
    options = _rewrite(options, "ctstate", _bit_list(_CT_STATES))
    return _rewrite(options, "ctstatus", _bit_list(_CT_STATUSES))


_ADDR_TYPES = (
    "UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST",
    "BLACKHOLE", "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE",
)  # fmt: skip


def _addrtype_fix(options: list[Option], family: IPFamily) -> list[Option]:
    fix = _bit_list(_ADDR_TYPES)
    return _rewrite(_rewrite(options, "src-type", fix), "dst-type", fix)


_MASK32 = 0xFFFFFFFF


def _mark_target_fix(options: list[Option], family: IPFamily) -> list[Option]:
    """Every MARK spelling is stored as (value, mask) and printed as `--set-xmark value/mask`."""
    out = []
    for o in options:
        parsed = _mark_mask(o.args[0]) if o.args else None
        if parsed is None or o.name not in ("set-xmark", "set-mark", "and-mark", "or-mark", "xor-mark"):
            out.append(o)
            continue
        value, mask = parsed
        full = _MASK32 if mask is None else mask
        mark, xmask = {
            "set-xmark": (value, full),
            "set-mark": (value, value | full),
            "and-mark": (0, ~value & _MASK32),
            "or-mark": (value, value),
            "xor-mark": (value, 0),
        }[o.name]
        out.append(Option("set-xmark", (f"{hex(mark)}/{hex(xmask)}",), o.negated))
    return out


def _nat_address(value: str, family: IPFamily) -> str:
    """`IP[-IP][:PORT[-PORT]]` with IPv6 in brackets when a port follows, as libxt_NAT prints it."""
    if family is IPFamily.V6:
        m = re.fullmatch(r"\[([^\]]*)\](?::(.*))?|([^\[\]]*)", value)
        if not m:
            return value
        addrs, ports = (m.group(1), m.group(2)) if m.group(3) is None else (m.group(3), None)
    else:
        addrs, _, ports = value.partition(":")
    ips = "-".join(_address(a, family, with_prefix=False) for a in addrs.split("-")) if addrs else ""
    if ports:
        ports = "-".join(_ports(p) for p in ports.split("-"))
        if len(set(ports.split("-"))) == 1:
            ports = ports.split("-")[0]
        return f"[{ips}]:{ports}" if family is IPFamily.V6 else f"{ips}:{ports}"
    return ips


def _nat_fix(name: str) -> Fixer:
    def fix(options: list[Option], family: IPFamily) -> list[Option]:
        return _rewrite(options, name, lambda v: _nat_address(v, family))

    return fix


_REJECT_ALIASES = {
    IPFamily.V4: {
        "net-unreach": "icmp-net-unreachable", "host-unreach": "icmp-host-unreachable",
        "port-unreach": "icmp-port-unreachable", "proto-unreach": "icmp-proto-unreachable",
        "net-prohib": "icmp-net-prohibited", "host-prohib": "icmp-host-prohibited",
        "admin-prohib": "icmp-admin-prohibited", "tcp-rst": "tcp-reset",
    },
    IPFamily.V6: {
        "no-route": "icmp6-no-route", "adm-prohibited": "icmp6-adm-prohibited",
        "addr-unreach": "icmp6-addr-unreachable", "port-unreach": "icmp6-port-unreachable",
        "tcp-rst": "tcp-reset",
    },
}  # fmt: skip


def _reject_fix(options: list[Option], family: IPFamily) -> list[Option]:
    if not _has(options, "reject-with"):
        default = "icmp-port-unreachable" if family is IPFamily.V4 else "icmp6-port-unreachable"
        return [*options, Option("reject-with", (default,))]
    return _rewrite(options, "reject-with", lambda v: _REJECT_ALIASES[family].get(v, v))


def _log_fix(options: list[Option], family: IPFamily) -> list[Option]:
    options = [o for o in options if not (o.name == "log-level" and o.args in (("4",), ("warning",)))]
    return _rewrite(options, "log-prefix", save_string)


MATCHES: dict[str, Spec] = {
    "tcp": Spec(
        ("sport", "dport", "tcp-flags", "syn", "tcp-option"),
        {"source-port": "sport", "destination-port": "dport"},
        _tcp_fix,
    ),
    "udp": Spec(("sport", "dport"), {"source-port": "sport", "destination-port": "dport"}, _port_fix),
    "sctp": Spec(
        ("sport", "dport", "chunk-types"), {"source-port": "sport", "destination-port": "dport"}, _port_fix
    ),
    "multiport": Spec(
        ("sports", "dports", "ports"),
        {"source-ports": "sports", "destination-ports": "dports"},
        _multiport_fix,
    ),
    "comment": Spec(("comment",), fix=_comment_fix),
    "statistic": Spec(("mode", "probability", "every", "packet"), fix=_statistic_fix),
    "recent": Spec(
        (
            "set", "rcheck", "update", "remove", "seconds", "reap", "hitcount", "rttl",
            "name", "mask", "rsource", "rdest",
        ),
        fix=_recent_fix,
    ),
    "mark": Spec(("mark",), fix=_mark_fix),
    "conntrack": Spec(
        (
            "ctstate", "ctproto", "ctorigsrc", "ctorigdst", "ctreplsrc", "ctrepldst", "ctorigsrcport",
            "ctorigdstport", "ctreplsrcport", "ctrepldstport", "ctstatus", "ctexpire", "ctdir",
        ),
        fix=_conntrack_fix,
    ),  # fmt: skip
    "addrtype": Spec(("src-type", "dst-type", "limit-iface-in", "limit-iface-out"), fix=_addrtype_fix),
}

TARGETS: dict[str, Spec] = {
    "MARK": Spec(("set-xmark", "set-mark", "and-mark", "or-mark", "xor-mark"), fix=_mark_target_fix),
    "MASQUERADE": Spec(("to-ports", "random", "random-fully")),
    "DNAT": Spec(("to-destination", "random", "persistent"), fix=_nat_fix("to-destination")),
    "SNAT": Spec(("to-source", "random", "random-fully", "persistent"), fix=_nat_fix("to-source")),
    "REJECT": Spec(("reject-with",), fix=_reject_fix),
    "LOG": Spec(
        (
            "log-prefix", "log-level", "log-tcp-sequence", "log-tcp-options",
            "log-ip-options", "log-uid", "log-macdecode",
        ),
        fix=_log_fix,
    ),
    # Verdicts: no options of their own.
    "ACCEPT": Spec(()),
    "DROP": Spec(()),
    "RETURN": Spec(()),
}


# ---------------------------------------------------------------------------------------------
# canonical text
# ---------------------------------------------------------------------------------------------


_IPV4 = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?:/(\d{1,2}))?")


def _address(value: str, family: IPFamily, with_prefix: bool = True) -> str:
    """An address or network as iptables prints it: host bits cleared, `/32`/`/128` added.

    Host names, address lists and non-contiguous masks are left as written.
    """
    m = _IPV4.fullmatch(value) if family is IPFamily.V4 else None
    if m is not None:  # the common case, without ipaddress's cost
        octets = [int(g) for g in m.group(1, 2, 3, 4)]
        length = int(m.group(5)) if m.group(5) is not None else 32
        if max(octets) <= 255 and length <= 32:
            number = (octets[0] << 24 | octets[1] << 16 | octets[2] << 8 | octets[3]) & (
                (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
            )
            text = f"{number >> 24}.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}"
            return f"{text}/{length}" if with_prefix else text
    addr, sep, mask = value.partition("/")
    if ":" in mask:  # an IPv6 netmask: ipaddress only takes a prefix length
        try:
            bits = int(ipaddress.IPv6Address(mask))
        except ValueError:
            return value
        length = 128 - (~bits & (1 << 128) - 1).bit_length()
        if bits != ((1 << 128) - 1) ^ ((1 << (128 - length)) - 1):
            return value  # not contiguous
        value = f"{addr}/{length}"
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return value
    if net.version != family.value:
        return value
    return net.with_prefixlen if with_prefix else str(net.network_address)


def _canonical_module(module: Module, spec: Spec | None, family: IPFamily) -> Module:
    if spec is None:
        return module
    aliases = spec.aliases
    options = [o._replace(name=aliases[o.name]) if o.name in aliases else o for o in module.options]
    if spec.fix is not None:
        options = spec.fix(options, family)
    if len(options) > 1:
        # Stable: repeated or unknown options keep their written order (unknown ones last).
        rank = spec.rank
        options.sort(key=lambda o: rank.get(o.name, len(rank)))
    return Module(module.name, tuple(options))


# Options whose values the fixers already turned into iptables-save's quoting.
_PRE_QUOTED = {("comment", "comment"), ("LOG", "log-prefix")}


def _render_module(module: Module, out: list[str]) -> None:
    for o in module.options:
        if o.negated:
            out.append("!")
        out.append("--" + o.name)
        if (module.name, o.name) in _PRE_QUOTED:
            out += o.args
        else:
            out += [_word(a) for a in o.args]


def canonical_rule(rule: Rule, family: IPFamily) -> Rule:
    """The same rule as iptables-save would list it (see the module docstring)."""
    base = {key: (neg, value) for key, neg, value in rule.base}
    for key in ("s", "d"):
        if key in base:
            neg, value = base[key]
            base[key] = (neg, _address(value, family))
    if "p" in base:
        neg, proto = base["p"]
        proto = _PROTOCOL_NAMES.get(proto.lower(), proto.lower())
        if proto in ("all", "0") and not neg:
            del base["p"]  # matching every protocol is no match at all
        else:
            base["p"] = (neg, proto)
    matches = tuple(_canonical_module(m, MATCHES.get(m.name), family) for m in rule.matches)
    target = rule.target and _canonical_module(rule.target, TARGETS.get(rule.target.name), family)
    ordered = tuple((k, *base[k]) for k in _BASE_ORDER if k in base)
    return Rule(ordered, matches, target, rule.goto)


def render_rule(rule: Rule) -> str:
    """Rule text in iptables-save's layout: base options, then matches, then the target."""
    out: list[str] = []
    for key, neg, value in rule.base:
        if neg:
            out.append("!")
        out.append("-" + key)
        if key != "f":
            out.append(_word(value))
    for m in rule.matches:
        if m.name:
            out += ("-m", m.name)
        _render_module(m, out)
    if rule.target is not None:
        out += ("-g" if rule.goto else "-j", rule.target.name)
        _render_module(rule.target, out)
    return " ".join(out)


def canonical(rule: str, family: IPFamily = IPFamily.V4) -> str:
    """`rule` (the text after `-A CHAIN `) in the exact form iptables-save prints it."""
    return render_rule(canonical_rule(parse_rule(rule), family))


_TARGET = re.compile(r'(?:^|\s)(?:-j|--jump|-g|--goto)\s+("?)([^\s"]+)\1')


def jump_target(rule: str) -> str | None:
    """The chain or target a rule jumps to (`-j X` / `-g X`), read without a full parse."""
    m = _TARGET.search(rule)
    return m.group(2) if m else None
