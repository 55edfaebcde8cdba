"""The node agent's loop: sources → change tracker → sync scheduler → proxier, with metrics and health.

One thread owns all state: it drains the sources' event queue into the `ChangeTracker`, asks the
`SyncScheduler` when to sync, and hands each sync the tracker's snapshot. Services and
EndpointSlices from the API come already converted (`changes.PREPARE`, run by the reflectors on
their threads, page by page); raw objects (manifests, tests) are prepared here. Nothing is applied until
both Services and EndpointSlices have completed their first list, so an empty cache at startup
never wipes the node's rules. SIGTERM/SIGINT stop the loop and leave the rules in place, so
traffic keeps flowing across a restart; a restarted agent adopts what it finds (its first sync
is a full one, which diffs against the kernel instead of flushing).

An invalid object never holds the rest of the node back: both sources' rejections (the change
tracker's, and `sources.manifest_watch`'s for documents it could not use) are logged once each and
counted in `kproxy_nft_invalid_objects_total{kind}`; every valid object is programmed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import math
import queue
import threading
import time
from collections.abc import Callable

from kproxy_nft.agent.changes import ChangeTracker, PreparedSlice, Snapshot, prepare_service, prepare_slice
from kproxy_nft.agent.metrics import Metrics
from kproxy_nft.agent.scheduler import FULL_SYNC_PERIOD, CheckResult, SyncOutcome, SyncScheduler
from kproxy_nft.convert import InvalidObject, convert_node, convert_service_cidr
from kproxy_nft.kernel.nft_monitor import NftMonitor
from kproxy_nft.model import ClusterState, NodeContext, ServicePortName
from kproxy_nft.proxier import DriftCheck, Proxier
from kproxy_nft.sources.events import Change, Event, Rejection, Replace
from kproxy_nft.sources.manifests import no_cyclic_gc

log = logging.getLogger("kproxy_nft.agent")

RESOURCES = ("services", "endpointslices")


def release_free_memory() -> None:
    """Hand memory freed by a big relist, full sync or whole drift check back to the system
    (glibc's malloc_trim).

    Converting 10,000 Services and EndpointSlices through the client's typed models leaves
    hundreds of MB of freed heap that glibc keeps for reuse: at 10,000 services × 10 endpoints
    the agent measured 617 MB resident after its first sync and 284 MB after a trim. A no-op
    where libc has no malloc_trim (musl).

    Unreachable cycles are collected first (syncs run with the collector paused,
    `no_cyclic_gc`). The iptables agent at 10k goes from 137 to 123 MiB with it: some hundred
    small objects in cycles (pyroute2's, from reading the node's addresses at start) lay among
    the first sync's transient allocations and kept ~14 of pymalloc's 1 MiB arenas in use.
    The collection takes 0.2 s at that size, after relists, full syncs and whole drift checks only.
    """
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own libc; no ldconfig lookup
    if trim is not None:
        trim(0)


class _WakingStop(threading.Event):
    """`Agent.stop`: setting it also wakes whoever waits for it elsewhere (`wakers`): the loop,
    which sleeps on its queue until work is due, and the main thread (`runtime.StopSignals`)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self.wakers = [wake]

    def set(self) -> None:
        super().set()
        for wake in self.wakers:
            wake()


@dataclasses.dataclass(frozen=True)
class _Wake:
    """Queued only to end the loop's wait."""


@dataclasses.dataclass(frozen=True)
class _DriftNotice:
    """The kernel announced a foreign change to these tables of ours (from `nft_monitor`'s thread),
    to the rules of these chains and the elements of these `@sets` only (None: more than that)."""

    tables: frozenset[str]
    chains: frozenset[str] | None


@dataclasses.dataclass(frozen=True)
class _MonitorStopped:
    """The nf_tables notifications stopped for good (from `nft_monitor`'s thread): why."""

    reason: str


@dataclasses.dataclass(frozen=True)
class _CheckDone:
    """A drift check finished on its thread: its result, or why it failed."""

    noticed_by: str
    check: DriftCheck | None
    error: str = ""
    whole: bool = False  # it compared everything (not only what a notification named)


_Item = Event | _Wake | _DriftNotice | _MonitorStopped | _CheckDone


def _trigger_times(slices: list[PreparedSlice]) -> list[float]:
    """EndpointSlice last-change-trigger-time annotations (for network programming latency)."""
    return [eps.trigger_time for eps in slices if eps.trigger_time is not None]


class Agent:
    def __init__(self, proxier: Proxier, metrics: Metrics, min_sync_period: float, sync_period: float,
                 clock: Callable[[], float] = time.time, full_sync_period: float = FULL_SYNC_PERIOD) -> None:
        self.proxier = proxier
        self.metrics = metrics
        self.events: queue.Queue[_Item] = queue.Queue()
        self.tracker = ChangeTracker()
        self._stop = _WakingStop(lambda: self.events.put(_Wake()))
        self.stop: threading.Event = self._stop
        self.listed: set[str] = set()
        self._cleanup_failures_seen = 0  # the proxier's count already exported
        # Node fields given by flags, which the Node and ServiceCIDR objects must not override.
        self.fixed_node_fields: frozenset[str] = frozenset()
        self._service_cidrs: dict[str, tuple[str, ...]] = {}  # ServiceCIDR name → its CIDRs
        self._service_cidrs_rejected: dict[str, str] = {}  # ServiceCIDR name → why (reported once)
        self._clock = clock
        self._pending_triggers: list[float] = []
        self.syncs = 0
        self._snapshot: Snapshot | None = None
        self.scheduler = SyncScheduler(self._sync, clock, min_sync_period, sync_period,
                                       full_sync_period=full_sync_period, check=self._start_check)
        self._monitor: NftMonitor | None = None
        self._watch_drift = False  # `run` watches from its first sync on; tests that step by hand don't
        self._noticed: frozenset[str] = frozenset()  # tables named by notifications since the last check
        self._noticed_chains: frozenset[str] | None = frozenset()  # their chains (None: compare all)
        # A check that compared everything read the whole kernel back and compiled everything
        # (iptables: hundreds of MiB at 10,000 services, freed once its result is dropped).
        self._release_memory = False
        # Called with the state just synced, after the kernel took it (health-check servers).
        self.after_sync: list[Callable[[ClusterState], None]] = []
        # First, stale UDP/SCTP conntrack flows go (kproxy_nft.conntrack).
        self.after_sync.append(self._clean_conntrack)
        self._synced_changes: frozenset[ServicePortName] | None = None  # of the sync the hooks run after

    @property
    def stop_wakers(self) -> list[Callable[[], None]]:
        """Called when `stop` is set, besides waking the loop."""
        return self._stop.wakers

    @property
    def synced_changes(self) -> frozenset[ServicePortName] | None:
        """For an after-sync hook: the service ports the sync changed (None: a full sync, all of them)."""
        return self._synced_changes

    # -- events -------------------------------------------------------------------------------

    def _apply_event(self, item: _Item) -> None:
        if isinstance(item, _Wake):
            return
        if isinstance(item, _DriftNotice):
            self._noticed |= item.tables
            if self._noticed_chains is not None:
                self._noticed_chains = None if item.chains is None else self._noticed_chains | item.chains
            self.scheduler.request_check("netlink")
            return
        if isinstance(item, _MonitorStopped):
            self._fall_back_to_probing(item.reason)
            self.scheduler.request_check("netlink")  # what happened since the last notification is unknown
            return
        if isinstance(item, _CheckDone):
            self._finish_check(item)
            return
        if isinstance(item, Rejection):  # a source could not use an object: nothing changes
            self._report(item)
            return
        if item.resource == "nodes":
            self._node_event(item)
            return
        if item.resource == "servicecidrs":
            self._service_cidr_event(item)
            return
        t = self.tracker
        objs = item.items if isinstance(item, Replace) else (item.obj,)
        count = 1 if isinstance(item, Change) else max(len(objs), 1)
        if item.resource == "endpointslices":
            # The API's reflectors hand on prepared values (converted on their threads, page by
            # page); other sources raw objects, prepared here. Preparing a prepared one is a no-op.
            slices = [prepare_slice(obj) for obj in objs]
            self.metrics.endpoint_changes.inc(count)
            self._pending_triggers += _trigger_times(slices)
            if isinstance(item, Replace):
                t.replace_slices(slices)
            else:
                (t.slice_deleted if item.type == "DELETED" else t.slice_updated)(slices[0])
        else:
            services = [prepare_service(obj) for obj in objs]
            self.metrics.service_changes.inc(count)
            if isinstance(item, Replace):
                t.replace_services(services)
            else:
                (t.service_deleted if item.type == "DELETED" else t.service_updated)(services[0])
        if isinstance(item, Replace):
            self.listed.add(item.resource)
        for rejection in t.take_rejections():
            self._report(rejection)
        self.metrics.last_queued_timestamp.set(self._clock())
        self.scheduler.request()

    def _report(self, rejection: Rejection) -> None:
        """One log line and one count per invalid object (the sources report each problem once)."""
        log.warning("invalid %s: %s (%s)", rejection.kind or "object", rejection.message, rejection.outcome)
        self.metrics.invalid_objects.labels(kind=rejection.kind or "unknown").inc()

    def _node_event(self, item: Replace | Change) -> None:
        """This node's Node object: its IPs and zone, for whatever the flags left unset.

        A deleted Node object changes nothing: the node is still here and the rules it has
        keep working.
        """
        objs = item.items if isinstance(item, Replace) else (() if item.type == "DELETED" else (item.obj,))
        if not objs:
            return
        info = convert_node(objs[0])
        current = self.proxier.node
        self._set_node(dataclasses.replace(
            current,
            node_ips=current.node_ips if "node_ips" in self.fixed_node_fields else info.ips,
            zone=current.zone if "zone" in self.fixed_node_fields else info.zone,
            pod_cidrs=info.pod_cidrs,  # --detect-local-mode NodeCIDR
        ))

    def _service_cidr_event(self, item: Replace | Change) -> None:
        """ServiceCIDR objects: the service IP ranges (nftables mode drops what is unallocated)."""
        previous = self._service_cidrs
        if isinstance(item, Replace):
            self._service_cidrs = {}
            objs = list(item.items)
            live = {obj.metadata.name for obj in objs}
            self._service_cidrs_rejected = {k: v for k, v in self._service_cidrs_rejected.items() if k in live}
        else:
            objs = [item.obj]
        for obj in objs:
            name = obj.metadata.name
            if isinstance(item, Change) and item.type == "DELETED":
                self._service_cidrs.pop(name, None)
                self._service_cidrs_rejected.pop(name, None)
                continue
            try:
                self._service_cidrs[name] = convert_service_cidr(obj)
                self._service_cidrs_rejected.pop(name, None)
            except InvalidObject as e:
                if name in previous:  # an invalid update keeps the previous valid version
                    self._service_cidrs[name] = previous[name]
                message = f"ServiceCIDR {name}: {e}"
                if self._service_cidrs_rejected.get(name) != message:
                    self._service_cidrs_rejected[name] = message
                    self._report(Rejection("ServiceCIDR", message,
                                           "kept its previous version" if name in previous else "skipped"))
        if "service_cidrs" not in self.fixed_node_fields:
            cidrs = tuple(dict.fromkeys(c for name in sorted(self._service_cidrs) for c in self._service_cidrs[name]))
            self._set_node(dataclasses.replace(self.proxier.node, service_cidrs=cidrs))

    def _set_node(self, updated: NodeContext) -> None:
        """A changed node context changes every service's rules (topology, node ports, service
        CIDRs), so the next sync recompiles everything."""
        if updated == self.proxier.node:
            return
        log.info("node %s: ips=%s zone=%s service-cidrs=%s", updated.hostname, ",".join(updated.node_ips) or "-",
                 updated.zone or "-", ",".join(updated.service_cidrs) or "-")
        self.proxier.set_node(updated)
        self.tracker.mark_all_changed()
        self.scheduler.request()

    def _drain(self, timeout: float | None) -> None:
        """Apply the queued events, waiting up to `timeout` seconds for the first (None: until one comes)."""
        try:
            item = self.events.get(timeout=None if timeout is None or timeout == math.inf else max(timeout, 0.0))
        except queue.Empty:
            return
        self._apply_event(item)
        while True:
            try:
                self._apply_event(self.events.get_nowait())
            except queue.Empty:
                break
        self.metrics.service_changes_pending.set(self.tracker.pending)
        self.metrics.endpoint_changes_pending.set(self.tracker.pending)

    # -- syncing ------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Both resources have completed their first list (never sync an empty cache)."""
        return self.listed >= set(RESOURCES)

    def _sync(self, full: bool) -> None:
        # A sync builds many objects and no cycles: the collector's passes over the whole state
        # were 10-25% of a cold iptables compile at 10k Services. It stays paused until the sync
        # is logged and its memory released: the first collection after it scans every object
        # the sync made and kept (0.14 s of a first sync at 10k, before its log line), and after
        # a full sync `release_free_memory` collects anyway.
        with no_cyclic_gc():
            self._sync_collector_paused(full)

    def _sync_collector_paused(self, full: bool) -> None:
        if full:
            self.tracker.mark_all_changed()
        snapshot = self.tracker.snapshot()
        for conflict in self.tracker.take_conflicts():
            log.warning("conflict: %s", conflict)
        started = time.perf_counter()
        repaired_before = self.proxier.drift()
        try:
            summary = self.proxier.sync(snapshot.state, full, None if snapshot.full else snapshot.changed_ports)
        except Exception as e:
            self._count_cleanup_failures()
            self.metrics.sync_failures[self.proxier.mode].inc()
            if not full and self.proxier.counts_partial_failures:  # kube-proxy: a partial restore failed
                self.metrics.iptables_partial_restore_failures.inc()
            log.error("sync mode=%s kind=%s services_changed=%d duration=%.3fs result=error error=%r",
                      self.proxier.mode, "full" if full else "partial", len(snapshot.changed),
                      time.perf_counter() - started, str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise
        duration = time.perf_counter() - started
        if self.syncs == 0 and self._watch_drift:
            try:
                self.watch_drift()
            except Exception:  # the rules are in: watching is extra, and the hourly check remains
                log.exception("drift: cannot watch for foreign changes")
        self.syncs += 1
        m = self.metrics
        m.sync_duration.observe(duration)
        (m.sync_full_duration if full else m.sync_partial_duration).observe(duration)
        m.last_sync_timestamp.set(self._clock())
        self._count_cleanup_failures()
        for (family, table), (total, written) in self.proxier.rule_counts().items():
            m.iptables_rules_total.family(family, table=table).set(total)
            m.iptables_rules_last.family(family, table=table).set(written)
        if full and self.proxier.drift() > repaired_before:
            self._count_repair((self.proxier.mode,), "full-sync")
        now = self._clock()
        for trigger in self._pending_triggers:
            m.network_programming.observe(max(now - trigger, 0.0))
        self._pending_triggers.clear()
        m.service_changes_pending.set(0)
        m.endpoint_changes_pending.set(0)
        log.info("sync mode=%s kind=%s services_changed=%d duration=%.3fs result=ok %s",
                 self.proxier.mode, "full" if full else "partial", len(snapshot.changed), duration, summary)
        self._synced_changes = None if snapshot.full else snapshot.changed_ports
        for hook in self.after_sync:
            try:
                hook(snapshot.state)
            except Exception:  # the rules are in; a hook's failure must not turn into a retried sync
                log.exception("after-sync hook %r failed", hook)
        if snapshot.full:
            # After relists and full syncs (and their hooks: the first one's handover reads the
            # kernel): the big transient allocations are freed by now.
            release_free_memory()

    def _count_cleanup_failures(self) -> None:
        """The proxier's cumulative count, as increments of kube-proxy's counter."""
        failures = self.proxier.cleanup_failures()
        if failures > self._cleanup_failures_seen:
            self.metrics.nftables_cleanup_failures.inc(failures - self._cleanup_failures_seen)
            self._cleanup_failures_seen = failures

    def _clean_conntrack(self, state: ClusterState) -> None:
        """Never fails the sync: errors are logged and counted, and retried by the next sync."""
        result = self.proxier.clean_conntrack(state, self._synced_changes)
        for reconciled in result.reconciled:  # a whole-table pass (start, full syncs, retries)
            self.metrics.conntrack_reconcile_duration.family(reconciled.family).observe(reconciled.seconds)
            self.metrics.conntrack_reconcile_deleted.family(reconciled.family).inc(reconciled.deleted)
        if result.errors:
            self.metrics.conntrack_cleanup_errors.inc(len(result.errors))
            log.error("conntrack cleanup: deleted=%d errors=%s", result.deleted, "; ".join(result.errors))
        elif result.filters:
            log.info("conntrack cleanup: filters=%d deleted=%d", len(result.filters), result.deleted)

    # -- drift ---------------------------------------------------------------------------------

    def watch_drift(self) -> None:
        """Listen to the kernel's nf_tables notifications where the mode's rules send them; else
        (iptables-legacy, or no netlink socket) probe canaries once per sync period."""
        interest = self.proxier.drift_interest()
        if interest is None:
            self.scheduler.probe = self._probe
            return
        try:
            self._monitor = NftMonitor(self.proxier.netns, interest,
                                       lambda tables, chains: self.events.put(_DriftNotice(tables, chains)),
                                       lambda reason: self.events.put(_MonitorStopped(reason))).start()
        except OSError as e:
            self._fall_back_to_probing(str(e))

    def _fall_back_to_probing(self, reason: str) -> None:
        """No nf_tables notifications (none to be had, or they stopped): probe the canaries."""
        log.warning("no nf_tables notifications (%s): probing canaries every %.0fs instead",
                    reason, self.scheduler.sync_period)
        if self._monitor is not None:
            self._monitor.stop()  # its thread has ended: this releases what it still holds
            self._monitor = None
        self.metrics.drift_monitor_unavailable.set(1)
        self.scheduler.probe = self._probe

    def _probe(self) -> None:
        try:
            missing = self.proxier.probe()
        except Exception as e:  # noqa: BLE001 - a probe that cannot look is a reason to check
            log.error("canary probe failed: %s", e)
            self.scheduler.request_check("canary")
            return
        if missing:
            self._count_repair(("canary",), "canary", ", ".join(missing))
            self.scheduler.request_check("canary")

    def _start_check(self, noticed_by: str) -> None:
        """Read back and compare on a thread of its own: the loop goes on syncing meanwhile.
        Only notifications name the chains (and sets) to compare; every other check compares everything."""
        chains, self._noticed_chains = self._noticed_chains, frozenset()
        focus = chains if noticed_by == "netlink" else None
        threading.Thread(target=self._check_in_background, args=(noticed_by, focus), name="drift-check",
                         daemon=True).start()

    def _check_in_background(self, noticed_by: str, chains: frozenset[str] | None) -> None:
        whole = chains is None
        try:
            check = self.proxier.check_drift(chains)
        except Exception as e:  # noqa: BLE001 - reported to the loop, which retries like a failed sync
            self.events.put(_CheckDone(noticed_by, None, f"{type(e).__name__}: {e}", whole))
            return
        self.events.put(_CheckDone(noticed_by, check, whole=whole))

    def _finish_check(self, done: _CheckDone) -> None:
        """On the loop's thread: repair what the check found, unless a sync of ours overtook it."""
        noticed, self._noticed = self._noticed, frozenset()
        self._release_memory |= done.whole
        check = done.check
        if check is None:
            log.error("drift check failed: %s", done.error)
            self.scheduler.check_done(None)
            return
        if not check.known:
            self.scheduler.check_done(CheckResult.UNKNOWN)
            return
        if check.stale:
            self._noticed, self._noticed_chains = noticed, None  # to be answered by the next check, whole
            self.scheduler.check_done(CheckResult.STALE)
            return
        if not check.differs:
            log.debug("drift check (%s): the kernel holds what we applied", done.noticed_by)
            self.scheduler.check_done(CheckResult.CLEAN)
            return
        try:
            repaired = self.proxier.repair(check)
        except Exception as e:  # noqa: BLE001 - a failed repair is a failed sync: full sync, backoff
            self.metrics.sync_failures[self.proxier.mode].inc()
            log.error("repair of %s failed: %s", ", ".join(check.differs), e)
            self.scheduler.check_done(None)
            return
        if not repaired:
            self._noticed = noticed  # still to be answered by the check that follows,
            self._noticed_chains = None  # which compares everything: the named chains are spent
            self.scheduler.check_done(CheckResult.STALE)
            return
        self._count_repair(check.differs, done.noticed_by, ", ".join(sorted(noticed)))
        self.scheduler.check_done(CheckResult.REPAIRED)

    def _count_repair(self, what: tuple[str, ...], noticed_by: str, detail: str = "") -> None:
        """One count and one log line per repair."""
        label = ",".join(what)
        self.metrics.drift_repairs.labels(what=label, noticed_by=noticed_by).inc()
        log.warning("drift repaired: what=%s noticed_by=%s%s", label, noticed_by,
                    f" ({detail})" if detail else "")

    # -- the loop -----------------------------------------------------------------------------

    def step(self, max_wait: float | None = None) -> SyncOutcome | None:
        """One turn of the loop: wait for events until work is due (at most `max_wait` seconds),
        apply them, then do the work that is due. At rest the wait lasts until the next probe
        or safety-net check: nothing is read, compiled or planned meanwhile."""
        wait = self.scheduler.next_due() - self._clock() if self.ready() else None
        if max_wait is not None:
            wait = max_wait if wait is None else min(wait, max_wait)
        self._drain(wait)
        if self._release_memory:  # the check's result is dropped by now (see `__init__`)
            self._release_memory = False
            release_free_memory()
        if not self.ready() or self.stop.is_set():
            return None
        outcome = self.scheduler.run_due()
        if outcome is not None and not outcome.ok:
            log.warning("%s failed; retrying with a full sync at %.1f", outcome.work, self.scheduler.next_due())
        return outcome

    def run(self) -> None:
        """Until `stop` is set: take events, sync when due. Rules stay in place on exit.

        Drift is watched from the end of the first sync on (`watch_drift`): that sync read the
        kernel, and the notifications of its own commits (hundreds of thousands of objects at
        10,000 services) would overrun the socket, then cost a needless check.
        """
        self._watch_drift = True
        try:
            while not self.stop.is_set():
                self.step()
        finally:
            if self._monitor is not None:
                self._monitor.stop()
        log.info("stopping; the rules stay in place")
