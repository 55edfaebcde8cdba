"""`kproxy-nft diff` reports as text (a terminal), JSON (a contract, docs/DIFF.md) or Markdown (a CI comment).

Text and Markdown say the same things: each service port's details come from one place
(`_details`) and only their layout differs. Pure: strings in, strings out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from kproxy_nft.conntrack import FlowFilter, Frontend
from kproxy_nft.diff import Answering, DiffReport, FieldChange, RuleChange, ServicePortDiff, Value

FORMATS = ("text", "json", "markdown")
MARKDOWN_RULES_LIMIT = 50_000  # characters of rules in a Markdown report: a comment takes 65,536
_LIVE_NOTE = "not compared with --live: the kernel holds rules, not Services"


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def _frontend_json(fe: Frontend) -> dict[str, Any]:
    return {"family": int(fe.family), "protocol": fe.protocol.lowercase, "address": fe.ip, "port": fe.port}


def _flow_json(f: FlowFilter) -> dict[str, Any]:
    endpoint = None
    if f.endpoint is not None:
        ip, port = f.endpoint
        endpoint = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return {**_frontend_json(f.frontend), "endpoint": endpoint, "reason": str(f.reason)}


def _fields_json(changes: Iterable[FieldChange]) -> list[dict[str, Value]]:
    return [{"field": c.field, "old": c.old, "new": c.new} for c in changes]


def _service_json(s: ServicePortDiff) -> dict[str, Any]:
    return {
        "name": str(s.name), "namespace": s.name.namespace, "service": s.name.name, "port": s.name.port,
        "protocol": str(s.name.protocol), "status": str(s.status), "type": s.service_type,
        "fields": _fields_json(s.fields),
        "endpoints": [{"family": int(e.family), "added": list(e.added), "removed": list(e.removed)}
                      for e in s.endpoints],
        "frontends": [{**_frontend_json(f.frontend), "kind": f.kind, "change": str(f.change)} for f in s.frontends],
        "stale_flows": [_flow_json(f) for f in s.stale_flows],
    }


def as_json(report: DiffReport) -> dict[str, Any]:
    """The JSON document (schema: docs/DIFF.md); `node` and `services` are null with --live."""
    rules = report.rules
    return {
        "differs": report.differs,
        "mode": rules.mode,
        "node": None if report.state is None else _fields_json(report.state.node),
        "services": None if report.state is None else [_service_json(s) for s in report.state.services],
        "rules": {"source": rules.source, "changes": not rules.is_empty, "lines": list(rules.lines),
                  "payload": rules.payload},
    }


def render_json(report: DiffReport) -> str:
    return json.dumps(as_json(report), indent=2) + "\n"


# ---------------------------------------------------------------------------------------------
# what text and Markdown both show
# ---------------------------------------------------------------------------------------------


def _shown(value: Value) -> str:
    if value is None or value == []:
        return "(none)"
    return ", ".join(value) if isinstance(value, list) else str(value)


def _plain(text: str) -> str:
    return text


def _code(text: str) -> str:
    return f"`{text}`"


def _field_line(c: FieldChange, quote: Callable[[str], str]) -> str:
    return f"{c.field}: {quote(_shown(c.old))} → {quote(_shown(c.new))}"


def _details(s: ServicePortDiff, quote: Callable[[str], str]) -> list[str]:
    """The lines of one service port, `label: items`, in the order both layouts show them;
    `quote` marks each value (Markdown: as code)."""
    lines = [_field_line(c, quote) for c in s.fields]
    for e in s.endpoints:
        lines += [f"IPv{int(e.family)} endpoints {kind}: {', '.join(map(quote, items))}"
                  for kind, items in (("added", e.added), ("removed", e.removed)) if items]
    for change in Answering:
        fronts = [f"{quote(str(f.frontend))} ({f.kind})" for f in s.frontends if f.change is change]
        if fronts:
            lines.append(f"{change}: {', '.join(fronts)}")
    if s.stale_flows:
        lines.append(f"{s.name.protocol} flows cleared: {', '.join(quote(str(f)) for f in s.stale_flows)}")
    return lines


def _title(s: ServicePortDiff) -> str:
    return f"{s.name} {s.name.protocol} ({s.service_type}): {s.status}"


def _rules_heading(rules: RuleChange, command: str) -> str:
    how = ("OLD applied to an empty in-memory node, NEW planned against it" if rules.source == "offline"
           else "NEW planned against the rules the kernel holds now")
    return f"rules ({rules.mode}; {how}), as {command} prints them"


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------


def render_text(report: DiffReport) -> str:
    out: list[str] = []
    state = report.state
    if state is None:
        out.append(f"service ports: {_LIVE_NOTE}")
    elif state.is_empty:
        out.append("service ports: no change on this node")
    else:
        out += [f"node: {_field_line(c, _plain)}" for c in state.node]
        for s in state.services:
            out.append(_title(s))
            out += [f"  {line}" for line in _details(s, _plain)]
    out.append("")
    out.append(_rules_heading(report.rules, "`apply --dry-run`") + ":")
    out += report.rules.lines
    text = "\n".join(out) + "\n"
    return text + report.rules.payload


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _headline(report: DiffReport) -> str:
    state = report.state
    if not report.differs:
        return "no change on this node"
    if state is None or state.is_empty:
        return "the rules change"
    if not state.services:
        return "the node's settings change"
    count = len(state.services)
    return "1 service port changes" if count == 1 else f"{count} service ports change"


def _folded_rules(rules: RuleChange) -> list[str]:
    """The rules in a `<details>` block, cut to fit a comment (GitHub takes 65,536 characters)."""
    body = ("\n".join(rules.lines) + "\n" + rules.payload).rstrip("\n")
    if len(body) > MARKDOWN_RULES_LIMIT:
        cut = body[:MARKDOWN_RULES_LIMIT].rsplit("\n", 1)[0]
        left = body.count("\n") - cut.count("\n")
        body = f"{cut}\n… {left} more lines: see `kproxy-nft diff -o text`"
    summary = _rules_heading(rules, "<code>apply --dry-run</code>")
    return [f"<details><summary>{summary}</summary>", "", "```", body, "```", "", "</details>", ""]


def render_markdown(report: DiffReport) -> str:
    """A comment for a pull request: a headline, one list item per service port, the rules folded."""
    out = [f"### kproxy-nft diff ({report.rules.mode}): {_headline(report)}", ""]
    state = report.state
    if state is None:
        out += [f"Service ports: {_LIVE_NOTE}.", ""]
    elif not state.is_empty:
        out += [f"- node: {_field_line(c, _code)}" for c in state.node]
        for s in state.services:
            out.append(f"- **{_code(str(s.name))}** {s.name.protocol} ({s.service_type}): {s.status}")
            out += [f"  - {line}" for line in _details(s, _code)]
        out.append("")
    rules = report.rules
    if rules.is_empty:
        out += [f"No rule changes ({rules.mode}).", ""]
    else:
        out += _folded_rules(rules)
    return "\n".join(out)


RENDERERS = {"text": render_text, "json": render_json, "markdown": render_markdown}
