"""The :class:`Datapath`: one object composed of parts with one job each (see the
package's docstring). It checks arguments, keeps the lifetime, and delegates."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, overload

import attrs

from pyebpflb import events as events_mod
from pyebpflb import maglev, maps
from pyebpflb._bpf import LoadedObject, fs
from pyebpflb._bpf.netns import current_id, entered
from pyebpflb.datapath import (
    adopt,
    explain,
    lifecycle,
    lock,
    migrate,
    notebook,
    repair,
    sockets,
)
from pyebpflb.datapath.apply import Programmer
from pyebpflb.datapath.hooks import Hooks, close_all
from pyebpflb.datapath.inspect import Inspector
from pyebpflb.datapath.limits import Limits
from pyebpflb.datapath.results import (
    Attachment,
    ConntrackTable,
    ConntrackTimeouts,
    DatapathStats,
    Explanation,
    Flow,
    Hook,
    MapInfo,
    ServiceStats,
    Traffic,
)
from pyebpflb.datapath.state import State, event_names, read_policy_state, read_snapshot
from pyebpflb.errors import Busy, DatapathClosed, PyEbpfLbError
from pyebpflb.events import EventStats, FlowEvent
from pyebpflb.layout import DATAPATH_NAME_MAX
from pyebpflb.model import (
    Address,
    Direction,
    Frontend,
    Node,
    Policy,
    Service,
    assemble,
    host_text,
)

logger = logging.getLogger("pyebpflb")

DEFAULT_PIN_ROOT = "/sys/fs/bpf/pyebpflb"
NAME_MAX = DATAPATH_NAME_MAX


class Datapath:
    """Service load balancing in the kernel, as one object.

    ``persist=False`` (the default): closing a datapath this object made
    detaches the programs and removes the pins. ``persist=True``: closing
    leaves everything running, and a later ``Datapath`` of the same name adopts
    it without a dropped packet. Closing a datapath that was adopted never
    tears it down, whatever ``persist`` says: only :meth:`destroy` does.
    ``netns`` names a network namespace (``ip netns`` name or path) to work in
    from outside it. ``create=False`` only adopts, keeping the datapath's
    settings (timeouts, events): without an existing datapath of that name it
    raises :class:`~pyebpflb.errors.NotFound`. ``pin=False`` makes no pins (an
    adopted datapath is found again through its attached programs): a look at
    a running datapath leaves no trace.
    ``events`` chooses the flow events the kernel sends ("trace", "drop",
    "policy"), ``event_rate`` how many a second each CPU may send.
    Balanced flows are tracked in three tables (entries: two a flow), so that
    pressure on one kind never evicts another: ``max_conntrack`` for TCP flows
    the backend answered, ``max_conntrack_syn`` for TCP flows it has not
    answered yet (a SYN flood churns only these), ``max_conntrack_udp`` for UDP.
    ``max_policy_conntrack`` sizes the table of flows policy lets answers
    through for.
    ``ct_gc_interval``: every so many seconds a thread of this object deletes
    the conntrack entries that expired (:meth:`collect_garbage`); ``None``: only
    when asked. The LRU tables never overflow, but without it the dead fill
    them, and their fill level says nothing; the counters of backends that
    left their service are also freed only by it (once their last flow ends).
    ``hairpin_addresses`` (IPv4, IPv6) are the sources a backend sees when it
    called its own service and was chosen (hairpin): its answers to them come
    back through the datapath. Routed towards the datapath, used by nothing
    else (Cilium's service loopback address is 169.254.42.1).
    ``node`` (a :class:`~pyebpflb.Node`) is the node the datapath serves: the
    backends whose ``node`` is its name are local, for services with
    ``internal_traffic_policy="local"``; its addresses are a local process's
    source as policy sees it at ``connect()``. Set once: an adopter that gives
    none keeps it, one that gives another is refused.
    """

    def __init__(
        self,
        name: str = "default",
        *,
        persist: bool = False,
        pin_root: str | os.PathLike[str] = DEFAULT_PIN_ROOT,
        netns: str | None = None,
        max_services: int = 65536,
        max_backends: int = 262144,
        max_conntrack: int = 262144,
        max_conntrack_syn: int = 65536,
        max_conntrack_udp: int = 131072,
        max_backends_per_service: int = 1024,
        max_affinity: int = 65536,
        maglev_table_size: int = maglev.DEFAULT_TABLE_SIZE,
        ct_timeouts: ConntrackTimeouts = ConntrackTimeouts(),  # noqa: B008 (frozen)
        max_policies: int = 4096,
        max_policy_rules: int = 65536,
        max_policy_entries: int = 1 << 20,
        max_policy_conntrack: int = 65536,
        events: Iterable[str] | None = ("trace", "drop", "policy"),
        event_rate: int = 10_000,
        hairpin_addresses: tuple[str, str] = ("169.254.42.1", "fd00:eb1b:42::1"),
        ct_gc_interval: float | None = 60.0,
        create: bool = True,
        pin: bool = True,
        node: Node | None = None,
    ) -> None:
        _check_name(name)
        if node is not None and not isinstance(node, Node):
            raise ValueError(
                f"node must be a pyebpflb.Node (its name, addresses, zone), got {node!r}"
            )
        if ct_gc_interval is not None and (
            isinstance(ct_gc_interval, bool)
            or not isinstance(ct_gc_interval, int | float)
            or not 0.1 <= ct_gc_interval <= 86400
        ):
            raise ValueError(
                f"ct_gc_interval must be None or seconds from 0.1 to 86400, got {ct_gc_interval!r}"
            )
        self.limits = Limits(
            max_services=max_services,
            max_backends=max_backends,
            max_conntrack=max_conntrack,
            max_conntrack_syn=max_conntrack_syn,
            max_conntrack_udp=max_conntrack_udp,
            max_backends_per_service=max_backends_per_service,
            max_affinity=max_affinity,
            max_policies=max_policies,
            max_policy_rules=max_policy_rules,
            max_policy_entries=max_policy_entries,
            max_policy_conntrack=max_policy_conntrack,
        )
        wanted = adopt.settings(
            ct_timeouts, events, event_rate, maglev_table_size, hairpin_addresses
        )
        self.name, self.persist, self.netns, self.create = name, persist, netns, create
        self.pin = pin
        self.pin_root = os.fspath(pin_root)
        self._node_wanted = node
        self._open(wanted)
        programs = {d: self._object.program(f"lb_{d.value}") for d in Direction}
        self._hooks = Hooks(netns, programs, self._object.map(maps.CT))
        self._programmer = Programmer(
            self._object, self._state, self.limits, self.settings.maglev_table_size, self._node_name
        )
        self._sockets = sockets.Sockets(self._object, self.pin_dir)
        self._inspector = Inspector(self._object, self._state, name, self.pin_dir)
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        self._gc_stop = threading.Event()
        self._gc_thread: threading.Thread | None = None
        if ct_gc_interval is not None:
            # A weak reference: the thread must not keep a forgotten Datapath alive.
            self._gc_thread = threading.Thread(
                target=_collect_every,
                args=(weakref.ref(self), self._gc_stop, float(ct_gc_interval)),
                name=f"pyebpflb-gc-{name}",
                daemon=True,
            )
            self._gc_thread.start()

    def _open(self, wanted: adopt.Settings) -> None:
        """Adopt the datapath of this name, or load a new one; pin and configure it."""
        with entered(self.netns):
            self._pin_base = fs.lasting(self.pin_root)
            self.pin_dir = adopt.pin_dir_for(self._pin_base, self.name)
            self._cookie = sockets.netns_cookie()
            self._lock_path = lock.path_for(self.name, current_id())
            self._reader_path = lock.reader_path_for(self.name, current_id())
            existing = adopt.find_existing(self.name, self.pin_dir)
            if not existing and not self.create:
                raise adopt.missing(self.name, self.netns, self.pin_dir)
            self.adopted = bool(existing)
            self.upgraded_from: int | None = None  # the layout an upgrade started from
            self._look_only: int | None = None  # an older layout looked at, not upgraded
            older = adopt.older_layout(existing, self.name)
            if older is not None and self.pin:
                close_all(existing)
                self._upgrade(wanted)
                return
            self._object, steps = adopt.load(self.name, self.limits.sizes(), existing, self.pin_dir)
            if steps:  # pin=False: a look, which never changes what runs
                self._look_only = older
        self._configure(wanted)

    def _configure(self, wanted: adopt.Settings, *, locked: bool = False) -> None:
        """Pin an adopted datapath and write lb_config. An adopted one's is written under
        the writer lock (unless the caller holds it): lb_config is read, changed and
        written whole, and another writer's change in between (its flip of the
        services map, its ids) would be written back as it was. A new one's config
        map is this object's alone."""
        self._pinned = False
        try:
            if self.adopted and self._look_only is None:
                self._ensure_pins()  # a new one is pinned once it is attached or changed
            shared = self.adopted and not locked
            with lock.held(self._lock_path) if shared else contextlib.nullcontext():
                if self._look_only is None:
                    self.node = sockets.write_node(self._object, self._node_wanted, self._cookie)
                else:
                    self.node = None
                self.settings = adopt.write_config(
                    self._object, self.name, wanted, adopted=self.adopted, keep=not self.create
                )
                self._state = State(self._object)
        except BaseException:
            self._object.close()
            raise

    def _upgrade(self, wanted: adopt.Settings) -> None:
        """Upgrade an older layout's datapath in place (migrate.py), holding the writer
        lock: the maps whose layout changed migrated, the new programs swapped in on
        every interface the old ones run on (tc's atomic replace), then what the new
        programs look for elsewhere moved, and the pins pointed at the maps in force.
        Reused maps keep conntrack, affinity and counters, so connections go on."""
        with lock.held(self._lock_path):
            existing = adopt.find_existing(self.name, self.pin_dir)  # again, under the lock
            self.upgraded_from = adopt.older_layout(existing, self.name)
            self._object, steps = adopt.load(self.name, self.limits.sizes(), existing, self.pin_dir)
            try:
                programs = {d: self._object.program(f"lb_{d.value}") for d in Direction}
                swap = Hooks(None, programs, self._object.map(maps.CT))
                interfaces = [f.iface for f in swap.ours([Direction.INGRESS])]
                self._configure(wanted, locked=True)  # pins too (a replaced map's pin)
                for iface in interfaces:
                    swap.attach(iface)
                sockets.reattach(self._object, self.pin_dir)
                for step in steps:
                    step.after(self._object)
            except BaseException:
                self._object.close()
                raise
        if steps:
            logger.info(
                "pyebpflb: datapath %s upgraded in place from layout %s to %d on %s",
                self.name,
                self.upgraded_from,
                migrate.LAYOUT_VERSION,
                ", ".join(interfaces) or "no interface",
            )

    @property
    def _node_name(self) -> str | None:
        return self.node.name if self.node is not None else None

    # The settings in force (an adopted datapath's own under create=False).
    ct_timeouts = property(lambda self: self.settings.ct_timeouts)
    events = property(lambda self: self.settings.events)
    event_rate = property(lambda self: self.settings.event_rate)
    maglev_table_size = property(lambda self: self.settings.maglev_table_size)
    hairpin_addresses = property(lambda self: self.settings.hairpin)

    def _live(self) -> LoadedObject:
        if self._object.closed:
            raise DatapathClosed(f"datapath {self.name!r} is closed")
        return self._object

    def _fresh(self) -> Any:
        """The kernel's config, our copy read again if another writer changed it."""
        self._live()
        return self._state.fresh()

    # -- hooks ---------------------------------------------------------------------------
    def attach(self, iface: str) -> Attachment:
        """Balance services arriving on ``iface`` and translate replies leaving it.
        Idempotent; attaching again after an upgrade swaps the programs in place
        without dropping traffic."""
        self._live()
        links = self._hooks.attach(iface)
        self._ensure_pins()
        return Attachment(iface, links[Direction.INGRESS], links[Direction.EGRESS])

    def detach(self, iface: str) -> None:
        """Stop balancing on ``iface`` (also when another process attached it);
        :class:`~pyebpflb.errors.NotFound`, changing nothing, when this datapath is
        not attached there."""
        self._live()
        self._hooks.detach(iface)

    def attach_cgroup(
        self, path: str | os.PathLike[str] | None = None, *, unconnected_udp: bool = True
    ) -> list[str]:
        """Balance at the socket for the processes of cgroup ``path`` (cgroup v2; None:
        the root of the hierarchy, every process) and of this datapath's network
        namespace: ``connect()`` and ``sendmsg()`` to a service go to a backend,
        ``recvmsg()`` and ``getpeername()`` show the service again. Sockets of other
        namespaces are untouched. ``unconnected_udp=False`` translates UDP at
        ``connect()`` only (Cilium's choice), sparing every ``sendmsg()`` a lookup.
        Idempotent; outlives this process (pinned links), and a later process
        attaching again swaps its programs in place. Returns the programs attached."""
        self._live()
        if not self.pin or self._look_only is not None:
            raise PyEbpfLbError(
                "attach_cgroup needs a pinned datapath (pin=True, the default): the "
                "attachment outlives this process only through its pins"
            )
        cgroup = sockets.resolve(path)
        self._ensure_pins()
        return self._sockets.attach(cgroup, unconnected_udp=unconnected_udp)

    def detach_cgroup(self, path: str | os.PathLike[str] | None = None) -> None:
        """Stop balancing at the socket for cgroup ``path`` (also when another process
        attached it); :class:`~pyebpflb.errors.NotFound`, changing nothing, when this
        datapath is not attached there."""
        self._live()
        self._sockets.detach(sockets.resolve(path))

    @property
    def cgroups(self) -> list[str]:
        """The cgroups this datapath balances sockets for."""
        self._live()
        return sockets.cgroups(self.pin_dir)

    @property
    def interfaces(self) -> list[str]:
        """Interfaces of the namespace that run this datapath."""
        self._live()
        return [f.iface for f in self._hooks.ours([Direction.INGRESS])]

    def hooks(self) -> list[Hook]:
        """Where this datapath's programs are attached in its network namespace."""
        self._live()
        return [
            Hook(f.iface, f"tc {f.direction.value}", f"lb_{f.direction.value}", f.prog_id)
            for f in self._hooks.ours()
        ]

    def whereabouts(self) -> lifecycle.DatapathInfo:
        """Where this datapath runs and where its state lives: interfaces, pins (and
        the maps whose pins are missing), layout version, the writer lock's holder."""
        self._live()
        with entered(self.netns):
            inode = current_id()
        layout = int(self._object.map(maps.CONFIG)[0].layout_version)
        found = lifecycle.info(
            self.name,
            self.netns,
            inode,
            self.interfaces,
            self.pin_dir,
            expected=self._object.maps,
        )
        return attrs.evolve(found, layout=layout)

    # -- programming ---------------------------------------------------------------------
    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold the datapath's writer lock over a block (waiting for another writer to
        finish): a read and the change planned from it then see no other change in
        between, as ``pyebpflb apply -f`` does (read the services, sync them with the
        manifest's). Every change takes it by itself; nested blocks are free. The
        lock is a ``flock`` the kernel drops with its holder."""
        self._live()
        if self._look_only is not None:
            raise PyEbpfLbError(
                f"datapath {self.name!r} runs layout {self._look_only}, older than this "
                f"pyebpflb's ({migrate.LAYOUT_VERSION}), and was opened with pin=False, which "
                "only looks: open it with pin=True (the default) to upgrade it in place first"
            )
        with self._thread_lock:
            if self._lock_depth:
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            if self.pin and not self._pinned:
                # Where the pins will go must take them before anything changes: a pin
                # root off bpffs refuses the change, not half of it.
                fs.ensure_bpffs(os.path.dirname(self.pin_dir))
            with lock.held(self._lock_path):
                self._lock_depth = 1
                try:
                    if repair.is_open(self._object):  # a writer died mid-change
                        repair.repair(self._object, self.name)
                        self._state.reload()
                    yield
                finally:
                    self._lock_depth = 0
        self._ensure_pins()

    _writing = write_lock  # every change: one at a time, across processes (lock.py)

    def _ensure_pins(self) -> None:
        """Pin the maps (unless ``pin=False``): an adopted datapath at once, a new one
        when it is first attached or changed, so a failed start leaves no pins."""
        if self.pin and not self._pinned:
            adopt.pin_maps(self._object, self.pin_dir)
            self._pinned = True

    def sync(self, services: Iterable[Service], policies: Iterable[Policy] | None = None) -> None:
        """Make the kernel hold exactly ``services`` (and ``policies``, unless None:
        then the installed policies stay); all or nothing."""
        with self._writing():
            self._programmer.sync(services, None if policies is None else list(policies))

    def upsert(self, service: Service, *, replace: bool = False) -> None:
        """Install ``service``, or update the one with its vip, port and protocol. When
        that one has another name (another service holds the frontend), it raises
        ``ValueError`` and changes nothing, unless ``replace`` says to take it over."""
        with self._writing():
            if not replace and isinstance(service, Service):
                self._fresh()
                for part in service.frontends():
                    held = self._state.snapshot.services.get(part.key)
                    if held is not None and held.service.name and held.service.name != part.name:
                        host = "*" if part.kind is Frontend.NODE_PORT else None
                        where = host_text(part.vip) if host is None else host
                        raise ValueError(
                            f"{where}:{part.port}/{part.protocol.value} is held by service "
                            f"{held.service.name!r}, not {part.name!r}: upsert(..., "
                            "replace=True) takes it over"
                        )
            self._programmer.upsert(service)

    def remove(self, service: Service) -> bool:
        """Remove the service with ``service``'s vip, port and protocol; False if none."""
        if not isinstance(service, Service):
            raise ValueError(f"remove takes a Service, got {service!r}")
        with self._writing():
            return self._programmer.remove(service.key)

    def upsert_policy(self, policy: Policy) -> None:
        """Install ``policy`` or replace the one of its name."""
        if not isinstance(policy, Policy):
            raise ValueError(f"expected a Policy, got {policy!r}")
        with self._writing():
            self._upsert_policy(policy)

    def _upsert_policy(self, policy: Policy) -> None:
        self._fresh()
        current = [p for _, p in self._state.policy.policies.values()]
        if policy in current:
            return
        names = [p.name for p in current]
        if policy.name in names:
            current[names.index(policy.name)] = policy
        else:
            current.append(policy)
        self._programmer.set_policies(current)

    def set_policies(
        self, policies: Iterable[Policy], *, keep: Callable[[Policy], bool] | None = None
    ) -> None:
        """Make the kernel hold exactly ``policies``, the services untouched; all or
        nothing (as :meth:`sync` with the installed services, without reading them).
        ``keep``: the installed policies it says True for stay too (ahead of
        ``policies``; one of the same name is replaced), decided under the write lock,
        so a policy another process installed meanwhile is not lost."""
        wanted = list(policies)
        with self._writing():
            self._fresh()
            if keep is not None:
                names = {p.name for p in wanted if isinstance(p, Policy)}
                installed = self._state.policy.policies.values()
                wanted = [p for _, p in installed if p.name not in names and keep(p)] + wanted
            self._programmer.set_policies(wanted)

    def remove_policy(self, policy: Policy | str) -> bool:
        """Remove the policy of ``policy``'s name (or the name given); False if none."""
        name = policy.name if isinstance(policy, Policy) else policy
        if not isinstance(name, str):
            raise ValueError(f"remove_policy takes a Policy or a policy name, got {policy!r}")
        with self._writing():
            return self._remove_policy(name)

    def _remove_policy(self, name: str) -> bool:
        self._fresh()
        installed = self._state.policy.policies
        if name not in installed:
            return False
        self._programmer.set_policies([p for n, (_, p) in installed.items() if n != name])
        return True

    # -- reading back --------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Closed (or destroyed): nothing more can be done with this object."""
        return bool(self._object.closed)

    @property
    def services(self) -> list[Service]:
        """The services the kernel holds, read from its maps, in the order installed (a
        Service with a NodePort, external or load-balancer IPs whole, as it was given)."""
        return assemble((i.service, i.origin) for i in read_snapshot(self._live()).in_order())

    @property
    def frontends(self) -> list[Service]:
        """Every entry the kernel holds, one per frontend (:meth:`Service.frontends`), as
        ``cilium service list`` shows them; each has its own counters (:meth:`stats`)."""
        return [i.service for i in read_snapshot(self._live()).in_order()]

    @property
    def policies(self) -> list[Policy]:
        """The policies the kernel holds, read from its maps, in the order installed."""
        return [p for _, p in read_policy_state(self._live()).policies.values()]

    @overload
    def stats(self, service: Service) -> ServiceStats: ...

    @overload
    def stats(self, service: None = None) -> DatapathStats: ...

    def stats(self, service: Service | None = None) -> ServiceStats | DatapathStats:
        """Packets and bytes sent to ``service`` and to each of its backends; without a
        service, every counter of the datapath. :class:`NotFound` if not installed."""
        self._fresh()
        if service is not None:
            return self._inspector.service_stats(service)
        return self._inspector.stats()

    def policy_stats(self, policy: Policy | str) -> list[Traffic]:
        """Packets and bytes each rule of the policy (by name) matched, in rule order."""
        self._fresh()
        return self._inspector.policy_stats(policy.name if isinstance(policy, Policy) else policy)

    def drops(self) -> dict[str, Traffic]:
        """Packets the datapath dropped or refused, by reason."""
        self._live()
        return self._inspector.drops()

    def event_stats(self) -> EventStats:
        """Flow events the kernel sent, lost (ring full) and held back (rate limit)."""
        self._live()
        return self._inspector.event_stats()

    def maps(self) -> list[MapInfo]:
        """Every map: type, entries in use and at most, pin path."""
        self._live()
        return self._inspector.map_infos()

    def flows(self, *, include_dead: bool = False) -> list[Flow]:
        """The live conntrack entries, decoded: balanced flows, their replies, and the
        flows policy lets answers through for; ``include_dead`` adds the dead ones
        still in the tables (see :meth:`conntrack`)."""
        return self._inspector.flows(self._fresh(), live_only=not include_dead)

    def conntrack(self, *, include_dead: bool = False) -> list[Flow]:
        """The live balanced flows' entries (service and reply), decoded. Entries
        that expired, or reply entries whose flow is gone, stay in the tables
        until a packet meets them or the garbage collector runs; ``include_dead``
        lists those too."""
        return self._inspector.flows(self._fresh(), maps.CT_TABLES, live_only=not include_dead)

    def collect_garbage(self) -> int:
        """Delete the conntrack entries that are dead: a flow past its timeout (both
        halves), a reply half without its live flow. Returns how many went. The
        datapath deletes such entries itself when a packet meets them; this keeps
        the tables from filling with the dead in between (Cilium's CT GC)."""
        self._live()
        return self._inspector.collect_garbage(self._object.map(maps.CONFIG)[0])

    def _stop_gc(self) -> None:
        self._gc_stop.set()
        if self._gc_thread is not None and self._gc_thread is not threading.current_thread():
            self._gc_thread.join()

    def conntrack_stats(self) -> list[ConntrackTable]:
        """Each conntrack table: entries in use and at most, flows made, moved on when
        answered, halves found evicted or restored, entries collected."""
        self._live()
        return self._inspector.conntrack_stats()

    def flush_conntrack(self) -> int:
        """Forget every tracked flow (and the ports of fragmented datagrams): the next
        packet of each picks a backend anew, and meets policy as a new flow.
        Returns how many conntrack entries went (balanced flows' and policy's)."""
        self._live()
        return self._inspector.flush_conntrack()

    def explain(
        self, src: str, dst: str, protocol: str = "tcp", *, direction: str = "ingress"
    ) -> Explanation:
        """What the datapath does with a packet ``src`` -> ``dst`` ("IP[:PORT]", IPv6 as
        "[IP]:PORT"): the programs run on a synthetic first packet (a TCP SYN or a UDP
        datagram) through BPF_PROG_TEST_RUN, deciding as for real traffic (existing
        conntrack entries included) but writing nothing: no flow, counter or event."""
        self._fresh()
        return explain.explain(self._object, self._state, src, dst, protocol, direction)

    # -- flow events ---------------------------------------------------------------------
    def open_monitor(
        self,
        types: Iterable[str] | str | None = None,
        *,
        service: str | None = None,
        address: str | Address | None = None,
        queue_size: int = 65536,
    ) -> events_mod.Monitor:
        """A :class:`~pyebpflb.events_mod.Monitor` on this datapath's events (close it).
        A datapath has one reader of events at a time (its ring buffer has one
        consumer): while another monitor, of any process, reads them this raises
        :class:`~pyebpflb.errors.Busy` naming it."""
        obj = self._live()
        lease = lock.Lease(self._reader_path)
        if not lease.held:
            holder = lock.describe(lease.holder) if lease.holder else "another process"
            raise Busy(
                f"datapath {self.name!r} already has a monitor: {holder} reads its flow "
                "events, and a ring buffer has one reader (a second would take half of the "
                "events from the first); stop that one, or read its output",
                lease.holder,
            )
        try:
            return events_mod.Monitor(
                obj.map(maps.EVENTS),
                events_mod.Names(functools.partial(event_names, obj), self.netns),
                reader_map=obj.map(maps.EVENT_READER),
                lease=lease,
                types=types,
                service=service,
                address=address,
                queue_size=queue_size,
            )
        except BaseException:
            lease.release()
            raise

    def monitor(
        self,
        types: Iterable[str] | str | None = None,
        timeout: float | None = None,
        *,
        service: str | None = None,
        address: str | Address | None = None,
    ) -> Iterator[FlowEvent]:
        """Flow events as they happen, for ``timeout`` seconds (None: until the loop
        stops), filtered by type ("trace", "drop", "policy"), service name and address.
        One monitor per datapath at a time (a ring buffer has one reader): a second
        raises :class:`~pyebpflb.errors.Busy` naming the first."""
        with_monitor = self.open_monitor(types, service=service, address=address)
        try:
            yield from with_monitor.events(timeout)
        finally:
            with_monitor.close()

    async def amonitor(
        self,
        types: Iterable[str] | str | None = None,
        timeout: float | None = None,
        *,
        service: str | None = None,
        address: str | Address | None = None,
    ) -> AsyncIterator[FlowEvent]:
        """:meth:`monitor` for asyncio: waits on the ring buffer's fd in the event loop."""
        with_monitor = self.open_monitor(types, service=service, address=address)
        try:
            async for event in with_monitor.aevents(timeout):
                yield event
        finally:
            with_monitor.close()

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release this object. A datapath this object made, without ``persist``, is
        also detached and unpinned (see :meth:`destroy`); one it adopted is never torn
        down by closing (a look at a running load balancer must not stop it): only
        :meth:`destroy` does that."""
        self._stop_gc()
        if self._object.closed:
            return
        if not self.persist and not self.adopted:
            self.destroy()
            return
        self._sockets.close()
        self._object.close()

    def destroy(self) -> None:
        """Detach from every interface of the namespace and remove the pins and maps."""
        self._stop_gc()
        if self._object.closed:
            return
        self._hooks.detach()
        sockets.remove_links(self.pin_dir)
        self._sockets.close()
        for map_name, bpf_map in self._object.maps.items():
            path = os.path.join(self.pin_dir, map_name)
            if os.path.exists(path):
                bpf_map.unpin(path)
        for path in (self._lock_path, self._reader_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # no writer or reader is left for a destroyed datapath
        lifecycle.remove_empty(self.pin_dir, self._pin_base)  # up to pin_root, if empty
        self._object.close()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_gc_stop", None)
        if stop is not None:
            stop.set()
        obj = getattr(self, "_object", None)
        if obj is not None and not obj.closed:
            warnings.warn(
                f"unclosed {self!r}: call close() or use `with`", ResourceWarning, stacklevel=2
            )

    # -- notebooks -----------------------------------------------------------------------
    def _repr_html_(self) -> str:
        if self._object.closed:
            return notebook.datapath_html(self.name, None, [])
        return notebook.datapath_html(self.name, self.services, self._hooks.ours())

    def flows_dataframe(
        self, events: Iterable[FlowEvent] | None = None, *, timeout: float = 1.0
    ) -> Any:
        """Flow events as a pandas DataFrame, one row each (Hubble's fields as columns):
        ``events`` given, or those that come within ``timeout`` seconds. Needs pandas."""
        return notebook.flows_dataframe(
            list(events) if events is not None else list(self.monitor(timeout=timeout))
        )

    def __repr__(self) -> str:
        closed = self._object.closed
        state = "closed" if closed else f"{len(self._state.snapshot.services)} services"
        where = f" netns={self.netns!r}" if self.netns else ""
        return f"<Datapath {self.name!r}{where} {state}>"


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name or "/" in name or len(name.encode()) > NAME_MAX:
        raise ValueError(f"datapath name must be 1 to {NAME_MAX} bytes without '/', got {name!r}")


def _collect_every(ref: weakref.ref[Datapath], stop: threading.Event, interval: float) -> None:
    """The collector thread: every ``interval`` seconds, while the datapath lives."""
    while not stop.wait(interval):
        datapath = ref()
        if datapath is None:
            return
        try:
            datapath.collect_garbage()
        except DatapathClosed:
            return
        except Exception:  # keep collecting; say why each time
            logger.exception("pyebpflb: conntrack garbage collection of %s failed", datapath.name)
        del datapath
