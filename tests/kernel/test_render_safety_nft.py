"""The kernel loads every nft script compiled from a hostile model that the compiler accepted.

tests/test_render_safety.py shows that a model with hostile strings (built directly, bypassing
validation) either is refused with `render.UnsafeValue` or renders exactly the lines meant, from
values inside their grammar. Here `nft -c -f -` checks those lines against a real kernel, in a
throwaway namespace `kpn-…` (deleted also when the test fails): a value that passes `render`
but does not load would turn the defence into an outage. Both families, one script, as `dump`
prints it.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, event, given, settings

from kproxy_nft.compile import nftables
from kproxy_nft.model import ClusterState, Endpoint, IPFamily, NodeContext, Protocol, ServicePort, ServicePortName
from tests.kernel.conftest import run_in
from tests.test_render_safety import compiled, models

pytestmark = pytest.mark.kernel


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(models(min_services=1, max_hostile=1))
def test_nft_loads_what_the_compiler_accepts(netns: str, model: tuple[ClusterState, NodeContext]) -> None:
    """Hostile text left in an accepted model sits in fields that only select endpoints."""
    state, node = model
    rulesets = compiled(nftables.compile_ruleset, state, node)
    assume(rulesets)
    event(f"elements: {sum(f.element_count for r in rulesets for f in r.fragments.values()) // 5 * 5}+")
    script = nftables.render_script(rulesets)
    result = run_in(netns, ["nft", "-c", "-f", "-"], script)
    assert result.returncode == 0, (result.stderr, script)


def test_nft_loads_ipv6_session_affinity(netns: str) -> None:
    """nft 1.0.6 aborted on the ip6 affinity map update; the ip6 table now leaves it out."""
    name = ServicePortName("ns", "web", "", Protocol.TCP)
    svc = ServicePort(name, 80, 80, cluster_ips=("fd00::1",), session_affinity_seconds=10800)
    state = ClusterState({name: svc}, {name: (Endpoint("fd00::2", 80),)})
    script = nftables.render_script(nftables.compile_ruleset(state, NodeContext(), IPFamily.V6))
    result = run_in(netns, ["nft", "-c", "-f", "-"], script)
    assert result.returncode == 0, result.stderr
