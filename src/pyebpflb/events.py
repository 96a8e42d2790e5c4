"""Flow events from the datapath, decoded into typed :class:`FlowEvent` objects.

The kernel writes ``struct pyebpflb_flow_event`` (``csrc/include/pyebpflb/lb.h``)
to one BPF ring buffer: ``trace`` for a new flow translated to a backend,
``drop`` for a packet dropped or refused (with its reason), ``policy`` for a
policy verdict (every denial, and the allowing of a new flow). A per-CPU rate
limit keeps a flood from swamping user space; what it holds back, and what
does not fit the ring, is counted (:class:`EventStats`), never silently lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import enum
import ipaddress
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from typing import Any

import attrs

from pyebpflb import maps
from pyebpflb._bpf import RingBuffer, ffi
from pyebpflb._bpf._libbpf import lib
from pyebpflb._bpf.netns import entered
from pyebpflb.layout import DROP_REASONS, DropReason, EventType
from pyebpflb.model import WITH_PORTS, Address, Direction, Verdict, endpoint_text, protocol_name

TYPES = {int(t): t.label for t in EventType}
TYPE_BITS = {name: 1 << code for code, name in TYPES.items()}


def verdict_of(drop_reason: str | None, *, shot: bool, translated: bool) -> Verdict:
    """What became of a packet: refused (no backend: a refusal went back), dropped
    (another reason, or the program's drop verdict), forwarded (translated to a
    backend) or passed."""
    if drop_reason == DropReason.NO_BACKEND.label:
        return Verdict.REFUSED
    if drop_reason is not None or shot:
        return Verdict.DROPPED
    return Verdict.FORWARDED if translated else Verdict.PASSED


def to_types(types: Iterable[str] | str | None) -> frozenset[str]:
    """Event types from names ("trace", "drop", "policy"); None: all."""
    if types is None:
        return frozenset(TYPE_BITS)
    chosen = frozenset([types] if isinstance(types, str) else types)
    unknown = sorted(chosen - set(TYPE_BITS))
    if unknown:
        raise ValueError(
            f"event types must be among {sorted(TYPE_BITS)}, got {', '.join(map(repr, unknown))}"
        )
    return chosen


@attrs.frozen
class FlowEvent:
    """One decision of the datapath, with Hubble's fields.

    ``verdict`` (a :class:`~pyebpflb.Verdict`, equal to its string): FORWARDED
    (trace), DROPPED or REFUSED (drop: refused is a reset or ICMP unreachable
    sent back), ALLOWED or DENIED (policy). ``direction`` is a
    :class:`~pyebpflb.Direction` (None if the kernel sent one this version
    does not know).
    ``drop_reason`` is readable, ``drop_reason_code`` the kernel's number.
    ``service`` and ``backend`` name what the flow was translated to (trace),
    ``policy`` and ``rule`` the rule that decided (``rule`` None: the
    direction's default), ``origin`` where that rule comes from when its policy
    said (:attr:`pyebpflb.Rule.origin`: "ingress rule 1" of the NetworkPolicy the
    policy is named after).
    """

    time: datetime.datetime
    type: str
    verdict: Verdict
    source: Address
    source_port: int
    destination: Address
    destination_port: int
    protocol: str
    interface: str
    direction: Direction | None
    length: int
    service: str | None = None
    backend: str | None = None
    drop_reason: str | None = None
    drop_reason_code: int | None = None  # enum pyebpflb_drop_reason
    policy: str | None = None
    rule: int | None = None
    is_reply: bool = False
    origin: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (addresses as strings, time in ISO 8601)."""
        return {
            field.name: (
                value.isoformat()
                if isinstance(value, datetime.datetime)
                else str(value)
                if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address))
                else value.value
                if isinstance(value, enum.Enum)
                else value
            )
            for field in attrs.fields(FlowEvent)
            for value in (getattr(self, field.name),)
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def __str__(self) -> str:
        def at(address: Address, port: int) -> str:
            return endpoint_text(address, port if self.protocol in ("tcp", "udp") else None)

        line = (
            f"{self.time.strftime('%H:%M:%S.%f')} {self.type.upper():<6} {self.verdict:<9} "
            f"{self.protocol} {at(self.source, self.source_port)} -> "
            f"{at(self.destination, self.destination_port)} {self.interface} "
            f"{self.direction or '?'}"
        )
        if self.service:
            line += f" service {self.service}"
        if self.backend:
            line += f" -> {self.backend}"
        if self.drop_reason:
            line += f" ({self.drop_reason})"
        if self.type == "policy" or self.drop_reason == "policy denied":
            line += (
                f" policy {self.policy} rule {self.rule}"
                if self.policy is not None
                else " (the direction's default)"
            )
            if self.origin is not None:
                line += f" ({self.origin})"
        return line


@attrs.frozen
class EventStats:
    """Events the kernel sent, and those it could not: ``lost`` (the ring buffer was
    full: user space did not keep up) and ``rate_limited`` (over the per-CPU rate)."""

    sent: int
    lost: int
    rate_limited: int


class Names:
    """Ids and interface indexes -> what a person reads; refreshed on a miss (at most
    once a second, so an unknown id in a flood costs nothing)."""

    def __init__(
        self,
        refresh: Callable[
            [], tuple[dict[int, str], dict[int, str], dict[int, tuple[str, int, str | None]]]
        ],
        netns: str | None,
    ) -> None:
        self._refresh = refresh
        self._netns = netns
        self._last = 0.0
        self.services: dict[int, str] = {}
        self.backends: dict[int, str] = {}
        self.rules: dict[int, tuple[str, int, str | None]] = {}
        self._ifaces: dict[int, str] = {}
        self.reload()

    def reload(self) -> None:
        self.services, self.backends, self.rules = self._refresh()
        self._last = time.monotonic()

    def _lookup(self, table: str, key: int) -> Any:
        found = getattr(self, table).get(key)
        if found is None and time.monotonic() - self._last > 1.0:
            self.reload()
            found = getattr(self, table).get(key)
        return found

    def service(self, service_id: int) -> str | None:
        if not service_id:
            return None
        return self._lookup("services", service_id) or f"service #{service_id}"

    def backend(self, backend_id: int) -> str | None:
        if not backend_id:
            return None
        return self._lookup("backends", backend_id) or f"backend #{backend_id}"

    def rule(self, rule_id: int) -> tuple[str | None, int | None, str | None]:
        """(policy, rule index, origin) of a rule id; all None for the default."""
        if not rule_id:
            return None, None, None
        found = self._lookup("rules", rule_id)
        return found if found is not None else (f"rule #{rule_id}", None, None)

    def interface(self, ifindex: int) -> str:
        """The interface's name; "socket" for the socket programs' events (no interface)."""
        if ifindex == 0:
            return "socket"
        name = self._ifaces.get(ifindex)
        if name is None:
            try:
                with entered(self._netns):
                    name = socket.if_indextoname(ifindex)
            except OSError:
                name = f"if{ifindex}"
            self._ifaces[ifindex] = name
        return name


def _clock_offset() -> float:
    """Seconds to add to CLOCK_MONOTONIC to get the wall clock."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


def decode(raw: Any, names: Names, offset: float) -> FlowEvent:
    """A ``struct pyebpflb_flow_event`` as a :class:`FlowEvent`."""
    family = int(raw.family)
    kind = TYPES.get(int(raw.type), f"type {int(raw.type)}")
    proto = int(raw.proto)
    reason = DROP_REASONS.get(int(raw.reason)) if kind == "drop" else None
    if kind == "policy":
        denied = int(raw.verdict) == lib.PYEBPFLB_POLICY_DENY
        verdict = Verdict.DENIED if denied else Verdict.ALLOWED
    else:
        verdict = verdict_of(reason, shot=kind == "drop", translated=True)
    policy, rule, origin = names.rule(int(raw.rule_id))
    backend = None
    if kind == "trace":
        nat = maps.addr_from(raw.nat_addr, family)
        backend = endpoint_text(nat, maps.port_from(int(raw.nat_port)))
    with_ports = proto in WITH_PORTS
    return FlowEvent(
        time=datetime.datetime.fromtimestamp(int(raw.time_ns) / 1e9 + offset, tz=datetime.UTC),
        type=kind,
        verdict=verdict,
        source=maps.addr_from(raw.saddr, family),
        source_port=maps.port_from(int(raw.sport)) if with_ports else 0,
        destination=maps.addr_from(raw.daddr, family),
        destination_port=maps.port_from(int(raw.dport)) if with_ports else 0,
        protocol=protocol_name(proto),
        interface=names.interface(int(raw.ifindex)),
        direction=maps.POLICY_DIR_OF.get(int(raw.dir)),
        length=int(raw.len),
        service=names.service(int(raw.service_id)),
        backend=backend,
        drop_reason=reason,
        drop_reason_code=int(raw.reason) if kind == "drop" else None,
        policy=policy,
        rule=rule,
        is_reply=bool(raw.is_reply),
        origin=origin,
    )


@attrs.frozen
class Wait:
    """A step of the monitor's loop: wait up to ``seconds`` for ring buffer records."""

    seconds: float


Step = FlowEvent | Wait


class Monitor:
    """Reads the datapath's ring buffer into a bounded queue of filtered events.

    One monitor per datapath at a time: a BPF ring buffer has one consumer,
    so a second reader would take half of the events from the first. A
    second monitor (any process) is refused, naming the first (``Datapath.open_monitor``).
    :attr:`received` counts the events this monitor took from the ring.
    The kernel sends events only while a monitor renews its presence (every
    second while :meth:`events` runs), and a new monitor starts with events
    from now on.
    ``queue_size`` bounds memory; events that arrive while the queue is full
    are counted in :attr:`overflowed` and dropped, as the kernel counts its own.
    """

    def __init__(
        self,
        ring_map: Any,
        names: Names,
        *,
        reader_map: Any = None,
        lease: Any = None,
        types: Iterable[str] | str | None = None,
        service: str | None = None,
        address: str | Address | None = None,
        queue_size: int = 65536,
    ) -> None:
        self.types = to_types(types)
        self.service = service
        self.address = ipaddress.ip_address(address) if address is not None else None
        self.names = names
        self.queue: collections.deque[FlowEvent] = collections.deque()
        self.queue_size = queue_size
        self.overflowed = 0
        self.received = 0
        self._type_codes = {code for code, name in TYPES.items() if name in self.types}
        self._offset = _clock_offset()
        self._reader_map = reader_map
        self._lease = lease  # the one-reader lock (lock.Lease), released by close()
        self._renewed = 0.0
        self.ring = RingBuffer(ring_map, self._on_event, event_type="struct pyebpflb_flow_event")
        # Events from now on: what an earlier reader left in the ring is dropped.
        self._discarding = True
        self.ring.consume()
        self._discarding = False
        self.renew()

    def renew(self) -> None:
        """Tell the kernel a reader is here (it sends events only while one renews
        this at least every 5 s; :meth:`events` does, every second)."""
        if self._reader_map is None:
            return
        self._renewed = time.monotonic()
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        self._reader_map.update(ffi.new("__u32 *", 0), ffi.new("__u64 *", now))

    def renew_if_due(self) -> None:
        """:meth:`renew` if the last renewal is a second old or more."""
        if time.monotonic() - self._renewed >= 1.0:
            self.renew()

    def _on_event(self, raw: Any) -> None:
        if self._discarding:
            return
        self.received += 1
        if int(raw.type) not in self._type_codes:
            return
        if len(self.queue) >= self.queue_size:
            self.overflowed += 1
            return
        event = decode(raw, self.names, self._offset)
        if self.service is not None and event.service != self.service:
            return
        if self.address is not None and self.address not in (event.source, event.destination):
            return
        self.queue.append(event)

    def _steps(self, timeout: float | None, wait_most: float) -> Generator[Step, None, None]:
        """The monitor's loop, written once (as psycopg writes its protocol): it yields
        each event, or a :class:`Wait` for records that the driver carries out, blocking
        (:meth:`events`) or in an asyncio loop (:meth:`aevents`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.ring.consume()
            while self.queue:
                yield self.queue.popleft()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            self.renew_if_due()
            yield Wait(wait_most if left is None else min(left, wait_most))

    def events(self, timeout: float | None) -> Iterator[FlowEvent]:
        """Events as they come, until ``timeout`` seconds pass (None: forever)."""
        for step in self._steps(timeout, 0.2):
            if isinstance(step, Wait):
                self.ring.poll(step.seconds)
            else:
                yield step

    async def aevents(self, timeout: float | None) -> AsyncIterator[FlowEvent]:
        """:meth:`events` for asyncio: waits on the ring buffer's fd in the running loop
        (waking at least every second, to renew the reader's presence)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.fileno(), ready.set)
        try:
            for step in self._steps(timeout, 1.0):
                if isinstance(step, Wait):
                    ready.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ready.wait(), step.seconds)
                else:
                    yield step
        finally:
            loop.remove_reader(self.fileno())

    def fileno(self) -> int:
        return self.ring.fileno()

    def close(self) -> None:
        self.ring.close()
        if self._lease is not None:
            self._lease.release()


__all__ = ["EventStats", "FlowEvent", "Monitor", "decode", "to_types"]
