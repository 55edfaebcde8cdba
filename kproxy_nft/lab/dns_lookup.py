"""A resolver client the way a pod resolves: resolv.conf search list and ndots, then one answer.

Run inside a namespace by the demo (`python -m kproxy_nft.lab.dns_lookup --resolv-conf FILE
NAME [TYPE]`), it prints one JSON object: the name that answered after the search list was
applied (`sample-clusterip-multi` → `sample-clusterip-multi.default.svc.cluster.local.`), the
records, and the names tried in order — what `curl http://sample-clusterip-multi:8080` does
inside a pod before it connects.
"""

from __future__ import annotations

import argparse
import json
import sys

import dns.exception
import dns.name
import dns.resolver


def candidates(name: str, search: list[dns.name.Name], ndots: int) -> list[str]:
    """The names a stub resolver tries, in order (resolv.conf(5)): with fewer than `ndots` dots
    the search domains come first — why `curl http://svc:8080` works inside a pod."""
    relative = dns.name.from_text(name, None)
    if relative.is_absolute():
        return [str(relative)]
    absolute = relative.concatenate(dns.name.root)
    searched = [relative.concatenate(domain) for domain in search]
    ordered = [absolute, *searched] if name.count(".") >= ndots else [*searched, absolute]
    return [str(n) for n in ordered]


def lookup(resolv_conf: str, name: str, rdtype: str, tcp: bool = False) -> dict[str, object]:
    resolver = dns.resolver.Resolver(filename=resolv_conf)
    resolver.lifetime = 3.0
    tried = candidates(name, list(resolver.search), resolver.ndots or 1)
    try:
        answer = resolver.resolve(name, rdtype, search=True, tcp=tcp)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers, dns.exception.Timeout) as e:
        return {"name": name, "type": rdtype, "tried": tried, "error": type(e).__name__}
    return {
        "name": name,
        "type": rdtype,
        "tried": tried,
        "answered": str(answer.qname),
        "records": [rr.to_text() for rr in answer],
        "ttl": answer.rrset.ttl if answer.rrset is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolv-conf", required=True)
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("name")
    parser.add_argument("type", nargs="?", default="A")
    args = parser.parse_args(argv)
    print(json.dumps(lookup(args.resolv_conf, args.name, args.type, args.tcp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
