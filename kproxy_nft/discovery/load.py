"""Read manifest paths into the discovery views' inputs (the only file I/O they need).

Reuses `sources.manifests.read_manifests` one file at a time, so that a problem only DNS
cares about (an ExternalName Service without `spec.externalName`, a bad endpoint hostname)
is reported like every other manifest error: one `ManifestError` line naming the file, the
object and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from kubernetes.client import V1Service

from kproxy_nft.convert import InvalidObject
from kproxy_nft.discovery.records import (
    DnsService,
    EndpointGroup,
    RecordOptions,
    RecordSet,
    build_record_set,
    dns_service,
    endpoint_group,
)
from kproxy_nft.sources.manifests import ManifestError, Manifests, expand_paths, read_manifests


@dataclass(frozen=True)
class Loaded:
    """Manifests read from PATHs, with the notices about what was skipped."""

    manifests: tuple[tuple[str, Manifests], ...]  # (source, what it holds), in path order

    @property
    def notices(self) -> tuple[str, ...]:
        return tuple(n for _, m in self.manifests for n in m.notices)

    @property
    def services(self) -> tuple[V1Service, ...]:
        return tuple(s for _, m in self.manifests for s in m.services)


def load(paths: Sequence[str], stdin: IO[str] | None = None) -> Loaded:
    """Read every manifest under `paths` (raises ManifestError)."""
    return Loaded(tuple(((p if p != "-" else "<stdin>"), read_manifests([p], stdin)) for p in expand_paths(paths)))


def dns_objects(loaded: Loaded) -> tuple[list[DnsService], list[EndpointGroup]]:
    """The DNS view of every Service and EndpointSlice (raises ManifestError naming file and field)."""
    services: list[DnsService] = []
    groups: list[EndpointGroup] = []
    for source, manifests in loaded.manifests:
        for svc in manifests.services:
            try:
                services.append(dns_service(svc))
            except InvalidObject as e:
                raise ManifestError(f"{source}: {_describe('Service', svc)}: {e}") from None
        for eps in manifests.endpoint_slices:
            try:
                group = endpoint_group(eps)
            except InvalidObject as e:
                raise ManifestError(f"{source}: {_describe('EndpointSlice', eps)}: {e}") from None
            if group is not None:
                groups.append(group)
    return services, groups


def load_record_set(
    paths: Sequence[str], options: RecordOptions, stdin: IO[str] | None = None
) -> tuple[RecordSet, tuple[str, ...]]:
    """Read `paths` into the RecordSet the DNS server answers from, with the reader's notices.

    Raises ManifestError.
    """
    loaded = load(paths, stdin)
    services, groups = dns_objects(loaded)
    return build_record_set(services, groups, options), loaded.notices


def _describe(kind: str, obj: object) -> str:
    meta = getattr(obj, "metadata", None)
    return f"{kind} {getattr(meta, 'namespace', None) or 'default'}/{getattr(meta, 'name', '?')}"
