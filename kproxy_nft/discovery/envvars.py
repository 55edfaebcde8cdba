"""The Service environment variables kubelet gives every container, as kubelet writes them.

Mirrors kubernetes `pkg/kubelet/envvars/envvars.go` (`FromServices`) and the selection in
`pkg/kubelet/kubelet_pods.go` (`getServiceEnvVarMap`):

* Only Services with a cluster IP count (`IsServiceIPSet`: not "", not "None"), so headless
  and ExternalName Services give nothing.
* The `kubernetes` Service of `default` is always included ("master services", even with
  `enableServiceLinks: false`); the other Services of the pod's namespace only with service
  links enabled (the default). A Service called `kubernetes` in the pod's own namespace
  replaces the one from `default`, as in kubelet.
* Per Service, with NAME = the name upper-cased and `-` → `_`:
  `NAME_SERVICE_HOST` (the primary cluster IP), `NAME_SERVICE_PORT` (the first port),
  `NAME_SERVICE_PORT_<PORTNAME>` per named port, then the Docker-link set: `NAME_PORT`
  (`<proto>://<ip>:<port>` of the first port) and per port `NAME_PORT_<port>_<PROTO>`,
  `..._PROTO`, `..._PORT`, `..._ADDR`. URLs use `net.JoinHostPort`, so IPv6 is bracketed.

kubelet keeps the variables in a map, so a name two Services both produce holds the value of
whichever came last; here Services are taken in (namespace, name) order, later ones winning.
The result is sorted by variable name (a container sees them in no particular order).
Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kubernetes.client import V1Service

MASTER_SERVICE_NAMESPACE = "default"  # kubelet's metav1.NamespaceDefault
MASTER_SERVICES = frozenset({"kubernetes"})


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str


def env_name(name: str) -> str:
    """kubelet's `makeEnvVariableName`: upper case, dashes to underscores."""
    return name.replace("-", "_").upper()


def _host_port(ip: str, port: int) -> str:
    """Go's `net.JoinHostPort`: an IPv6 address is put in brackets."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True)
class _Service:
    """The fields of a Service kubelet reads."""

    namespace: str
    name: str
    cluster_ip: str
    ports: tuple[tuple[str, int, str], ...]  # (name, port, protocol)

    @classmethod
    def of(cls, svc: V1Service) -> _Service:
        assert svc.metadata is not None and svc.spec is not None  # read_manifests checked both
        ports = tuple((p.name or "", int(p.port), p.protocol or "TCP") for p in svc.spec.ports or [])
        return cls(svc.metadata.namespace or "default", str(svc.metadata.name), svc.spec.cluster_ip or "", ports)


def visible_services(services: Iterable[V1Service], namespace: str, service_links: bool = True) -> list[_Service]:
    """The Services whose variables a pod in `namespace` gets, by kubelet's rule."""
    chosen: dict[str, _Service] = {}
    for svc in sorted((_Service.of(s) for s in services), key=lambda s: (s.namespace, s.name)):
        if svc.cluster_ip in ("", "None"):
            continue  # `IsServiceIPSet`: headless and ExternalName Services have no variables
        if svc.namespace == MASTER_SERVICE_NAMESPACE and svc.name in MASTER_SERVICES:
            chosen.setdefault(svc.name, svc)
        elif svc.namespace == namespace and service_links:
            chosen[svc.name] = svc
    return [chosen[name] for name in sorted(chosen)]


def service_variables(svc: _Service) -> list[EnvVar]:
    """`FromServices` for one Service, in kubelet's order."""
    prefix, ip = env_name(svc.name), svc.cluster_ip
    out = [EnvVar(f"{prefix}_SERVICE_HOST", ip)]
    if svc.ports:  # the API server requires a port for every Service with a cluster IP
        out.append(EnvVar(f"{prefix}_SERVICE_PORT", str(svc.ports[0][1])))
    out += [EnvVar(f"{prefix}_SERVICE_PORT_{env_name(name)}", str(port)) for name, port, _ in svc.ports if name]
    for i, (_, port, protocol) in enumerate(svc.ports):
        url = f"{protocol.lower()}://{_host_port(ip, port)}"
        if i == 0:
            out.append(EnvVar(f"{prefix}_PORT", url))  # "Docker special-cases the first port"
        port_prefix = f"{prefix}_PORT_{port}_{protocol.upper()}"
        out += [
            EnvVar(port_prefix, url),
            EnvVar(f"{port_prefix}_PROTO", protocol.lower()),
            EnvVar(f"{port_prefix}_PORT", str(port)),
            EnvVar(f"{port_prefix}_ADDR", ip),
        ]
    return out


def service_environment(services: Iterable[V1Service], namespace: str, service_links: bool = True) -> dict[str, str]:
    """The variables a container in `namespace` gets, sorted by name."""
    visible = visible_services(services, namespace, service_links)
    merged = {v.name: v.value for svc in visible for v in service_variables(svc)}
    return dict(sorted(merged.items()))


def render_env(variables: Mapping[str, str], output_format: str = "env") -> str:
    """`KEY=value` lines, or a JSON object (`output_format="json"`)."""
    if output_format == "json":
        return json.dumps(dict(variables), indent=2) + "\n"
    return "".join(f"{name}={value}\n" for name, value in variables.items())
