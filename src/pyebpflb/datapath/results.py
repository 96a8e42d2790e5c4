"""What a datapath reports: typed, frozen values (no cdata)."""

from __future__ import annotations

from typing import Any

import attrs

from pyebpflb import _html
from pyebpflb._bpf import TcLink
from pyebpflb.events import EventStats
from pyebpflb.model import Action, Backend, Direction, Protocol, Service, Verdict


@attrs.frozen
class ConntrackTimeouts:
    """How long an idle flow keeps its backend, in seconds."""

    tcp_syn: float = 60.0
    tcp_established: float = 21600.0
    tcp_closing: float = 10.0
    udp: float = 60.0

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(ConntrackTimeouts):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(
                    f"conntrack timeout {field.name} must be > 0 seconds, got {value!r}"
                )


@attrs.frozen
class Traffic:
    packets: int
    bytes: int


@attrs.frozen
class ServiceStats:
    """Packets and bytes sent to a service, in total and per backend; and the
    replies that came back through it (backend -> client), the same two ways."""

    service: Service
    packets: int
    bytes: int
    backends: dict[Backend, Traffic]
    replies: Traffic = Traffic(0, 0)
    backend_replies: dict[Backend, Traffic] = attrs.field(factory=dict)
    # Backends that left the service while flows may still name them: readable
    # until the garbage collector finds their last flow gone.
    removed_backends: dict[Backend, Traffic] = attrs.field(factory=dict)

    def _repr_html_(self) -> str:
        rows = [(str(b), t.packets, t.bytes) for b, t in self.backends.items()]
        caption = f"{self.service.label}: {self.packets} packets, {self.bytes} bytes"
        return _html.table(["backend", "packets", "bytes"], rows, caption)


@attrs.frozen
class ConntrackTable:
    """One conntrack table: how full it is and what happened to its flows.

    ``table``: "tcp" (TCP flows the backend answered), "tcp_syn" (TCP flows it
    has not answered yet) or "udp". ``entries`` are two a flow. ``orphaned``
    counts reply halves met after the LRU evicted their flow half (or another
    flow took the tuple), ``healed`` flow halves whose evicted reply half was
    restored; ``collected`` entries the garbage collector deleted.
    """

    table: str
    map: str
    entries: int
    max_entries: int
    created: int
    confirmed: int
    orphaned: int
    healed: int
    collected: int

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


@attrs.frozen
class DatapathStats:
    """Every counter of a datapath, summed over CPUs."""

    services: list[ServiceStats]
    policies: dict[str, list[Traffic]]  # policy name -> per rule, in rule order
    drops: dict[str, Traffic]  # by reason
    events: EventStats
    conntrack: list[ConntrackTable] = attrs.field(factory=list)

    def _repr_html_(self) -> str:
        rows: list[tuple[object, ...]] = []
        for st in self.services:
            rows.append((st.service.name or st.service.label, "service", st.packets, st.bytes))
            for backend, traffic in st.backends.items():
                rows.append(("", f"-> {backend}", traffic.packets, traffic.bytes))
        for name, rules in self.policies.items():
            for index, traffic in enumerate(rules):
                rows.append((name, f"rule {index}", traffic.packets, traffic.bytes))
        for reason, traffic in self.drops.items():
            rows.append(("drops", reason, traffic.packets, traffic.bytes))
        caption = (
            f"events sent {self.events.sent}, lost {self.events.lost}, "
            f"rate-limited {self.events.rate_limited}"
        )
        return _html.table(["what", "", "packets", "bytes"], rows, caption)


@attrs.frozen
class Explanation:
    """What the datapath does with one packet (:meth:`Datapath.explain`).

    ``verdict``: FORWARDED (translated to ``backend`` of ``service``), PASSED
    (not for a service, let through), REFUSED (a service without backends:
    reset or ICMP unreachable), DROPPED (``drop_reason``).
    ``policy_verdict`` is None when no policy applies to the direction;
    ``rule`` None with a verdict means the direction's default decided;
    ``origin`` is that rule's :attr:`~pyebpflb.Rule.origin` (a NetworkPolicy's
    "ingress rule 1"). ``endpoint`` is the address policies are for (the backend after translation
    on ingress, else the destination; the source on egress), ``subject`` the most
    specific subject CIDR holding it (its entry of ``lb_pol_addrs`` or
    ``lb_pol_subjects``) and
    ``selected_by`` the policies with subjects that select it (a NetworkPolicy's
    pyebpflb policies, named ``namespace/name``...); () and None when none does.
    """

    source: str
    destination: str
    protocol: Protocol
    direction: Direction
    verdict: Verdict
    service: Service | None
    backend: Backend | None
    policy_verdict: Action | None
    policy: str | None
    rule: int | None
    policy_default: bool
    drop_reason: str | None
    endpoint: str | None = None
    subject: str | None = None
    selected_by: tuple[str, ...] = ()
    origin: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "protocol": self.protocol.value,
            "direction": self.direction.value,
            "verdict": self.verdict.value,
            "service": self.service.name or self.service.label if self.service else None,
            "backend": str(self.backend) if self.backend else None,
            "policy_verdict": _POLICY_WORDS[self.policy_verdict] if self.policy_verdict else None,
            "policy": self.policy,
            "rule": self.rule,
            "origin": self.origin,
            "policy_default": self.policy_default,
            "drop_reason": self.drop_reason,
            "endpoint": self.endpoint,
            "subject": self.subject,
            "selected_by": list(self.selected_by),
        }


# How an explanation says what policy decided ("allowed", "denied"), as flow events do.
_POLICY_WORDS = {Action.ALLOW: Verdict.ALLOWED.value, Action.DENY: Verdict.DENIED.value}


@attrs.frozen
class MapInfo:
    """One map of a datapath: ``entries`` in use (None for a ring buffer)."""

    name: str
    type: str
    entries: int | None
    max_entries: int
    pin: str | None


@attrs.frozen
class Hook:
    """A program of the datapath attached to an interface."""

    interface: str
    hook: str  # "tc ingress" / "tc egress"
    program: str
    program_id: int


@attrs.frozen
class Flow:
    """A conntrack entry, as a person reads it.

    ``kind``: "service" (a balanced flow: ``source`` -> ``destination`` is the
    client's packet to the VIP, ``backend`` where it goes), "reply" (the reverse
    entry of a balanced flow), "policy-in"/"policy-out" (answers policy lets
    through on ingress/egress). ``expires_in`` is None for entries that do not
    expire on their own (reply entries live as long as their flow).
    """

    kind: str
    protocol: str
    source: str
    destination: str
    backend: str | None
    service: str | None
    age: float
    expires_in: float | None
    closing: bool  # in the short timeout: a RST, or a FIN from each side
    answered: bool
    created_ns: int = (
        0  # CLOCK_MONOTONIC at the flow's first packet: tells a flow from its successor
    )
    half_closed: bool = False  # one side sent FIN: the other may still send

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Attachment:
    """The datapath on one interface: ingress balances, egress reverse-translates."""

    iface: str
    ingress: TcLink
    egress: TcLink
