"""What a load balancer serves, as plain validated values: no kernel in sight.

Every class is an attrs frozen class; construction validates, so an invalid
``Service`` or ``Backend`` cannot exist. Limits that depend on a datapath
(how many backends one service may have) are checked by the datapath.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from typing import Any, TypeVar

import attrs

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
E = TypeVar("E", bound=enum.Enum)

NAME_MAX_BYTES = 255


class BackendState(enum.Enum):
    """Kubernetes endpoint conditions, as the datapath honours them.

    ``ACTIVE`` takes new flows. ``TERMINATING`` takes none while the service
    has an active backend, but its established flows continue (and it takes
    new flows when no active backend is left: Kubernetes' terminating-endpoint
    fallback). ``MAINTENANCE`` takes no new flow at all; established ones
    continue.
    """

    ACTIVE = "active"
    TERMINATING = "terminating"
    MAINTENANCE = "maintenance"


def _member(kind: type[E], what: str, value: object) -> E:
    """``value`` as a member of the enum ``kind``: the member itself or its name in any case."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value.lower())
        except ValueError:
            pass
    names = [repr(member.value) for member in kind]
    allowed = " or ".join(names) if len(names) == 2 else "one of " + ", ".join(names)
    raise ValueError(f"{what} must be {allowed}, got {value!r}")


def to_state(value: object) -> BackendState:
    return _member(BackendState, "backend state", value)


def _check_weight(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"weight must be an integer from 0 to 65535, got {value!r}")


class Scheduler(enum.Enum):
    """How a service picks a backend for a new flow.

    ``RANDOM``: a weighted random draw. ``MAGLEV``: the flow's hash in a Maglev
    table, so every load balancer with the same backends picks the same one,
    and a change of backends moves few flows.
    """

    RANDOM = "random"
    MAGLEV = "maglev"


def to_scheduler(value: object) -> Scheduler:
    return _member(Scheduler, "scheduler", value)


class TrafficPolicy(enum.Enum):
    """Kubernetes' ``internalTrafficPolicy``: ``CLUSTER`` sends a service's traffic to
    any backend; ``LOCAL`` only to the backends on the datapath's own node (and
    drops it when there are none, as kube-proxy does)."""

    CLUSTER = "cluster"
    LOCAL = "local"


def to_traffic_policy(value: object) -> TrafficPolicy:
    return _member(TrafficPolicy, "internal_traffic_policy", value)


def to_external_policy(value: object) -> TrafficPolicy:
    return _member(TrafficPolicy, "external_traffic_policy", value)


class Frontend(enum.Enum):
    """What a service entry of the datapath answers on (Cilium's service types).

    ``CLUSTER_IP``: its ``vip``. ``NODE_PORT``: its port on every address the
    datapath serves NodePorts on (its ``vip`` is ``0.0.0.0`` or ``::``, of the
    family it serves). ``EXTERNAL_IP`` and ``LOAD_BALANCER``: its ``vip``, an
    ``externalIPs`` or ``status.loadBalancer.ingress`` address. The last three
    are external: :attr:`Service.external_traffic_policy` applies, and a
    backend on another node is reached by SNAT to this node's address.
    A :class:`Service` with ``node_port``, ``external_ips`` or
    ``load_balancer_ips`` is one of each (:meth:`Service.frontends`).
    """

    CLUSTER_IP = "cluster_ip"
    NODE_PORT = "node_port"
    EXTERNAL_IP = "external_ip"
    LOAD_BALANCER = "load_balancer"

    @property
    def external(self) -> bool:
        return self is not Frontend.CLUSTER_IP


def to_frontend(value: object) -> Frontend:
    return _member(Frontend, "kind", value)


class Forwarding(enum.Enum):
    """How external traffic reaches a backend on another node (Cilium's
    ``service.cilium.io/forwarding-mode``). ``SNAT``: its source becomes the
    balancing node's address, and the answer comes back through it. ``DSR``
    (direct server return): the client's address stays, the frontend rides
    along in an IP option (IPv6: a destination options header), and the
    backend's node answers the client directly."""

    SNAT = "snat"
    DSR = "dsr"


def to_forwarding(value: object) -> Forwarding:
    return _member(Forwarding, "forwarding", value)


class Protocol(enum.Enum):
    TCP = "tcp"
    UDP = "udp"

    @property
    def number(self) -> int:
        """The IP protocol number (IPPROTO_TCP, IPPROTO_UDP)."""
        return PROTOCOL_NUMBERS[self.value]

    @classmethod
    def from_number(cls, number: int) -> Protocol:
        return cls(PROTOCOL_NAMES[number])


# IP protocol numbers and their names, for every protocol a flow or event may carry.
PROTOCOL_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp"}
PROTOCOL_NUMBERS = {name: number for number, name in PROTOCOL_NAMES.items()}
WITH_PORTS = frozenset({6, 17, 132})  # TCP, UDP, SCTP: the protocols a flow has ports in


def protocol_name(number: int) -> str:
    """ "tcp", "udp", "icmp", "icmpv6", or the number itself as text."""
    return PROTOCOL_NAMES.get(number, str(number))


def host_text(address: Address) -> str:
    """An address as it stands before a port: IPv6 in brackets."""
    return f"[{address}]" if address.version == 6 else str(address)


def endpoint_text(address: Address, port: int | None) -> str:
    """ "10.0.0.1:80", "[fd00::1]:80"; the bare host without a port."""
    return host_text(address) if port is None else f"{host_text(address)}:{port}"


def parse_endpoint(text: str, what: str, default_port: int | None) -> tuple[Address, int]:
    """("10.0.0.1:80" | "10.0.0.1" | "[fd00::1]:80" | "fd00::1") -> (address, port);
    without ``default_port`` the port is required. ``what`` names the argument in errors."""
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    address: Address | None
    try:
        address = ipaddress.ip_address(host)
        number = int(port) if port is not None else default_port
    except ValueError:
        address, number = None, None
    if address is None or number is None or not 1 <= number <= 65535:
        need = "IP[:PORT]" if default_port is not None else "IP:PORT"
        raise ValueError(f"{what} must be {need} (IPv6 as [IP]:PORT), got {text!r}")
    return address, number


def to_address(value: object) -> Address:
    """An IPv4 or IPv6 address from a string or an ``ipaddress`` object."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"an address must be an IPv4 or IPv6 address, got {value!r}")
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IPv4 or IPv6 address (e.g. '10.96.0.10' or 'fd00::10')"
        ) from None


def to_protocol(value: object) -> Protocol:
    return _member(Protocol, "protocol", value)


def _check_port(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be an integer from 1 to 65535, got {value!r}")


def _usable_address(what: str, address: Address) -> None:
    if address.is_unspecified or address.is_multicast:
        raise ValueError(f"{what} {address} is not a unicast address")


def _to_ip_list(value: Iterable[Any]) -> tuple[Address, ...]:
    """A sorted list of distinct addresses (the datapath keeps no order)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"addresses must be a list of addresses, got {value!r}")
    found = [to_address(item) for item in value]
    for address in found:
        _usable_address("address", address)
    if len(set(found)) != len(found):
        raise ValueError(f"addresses must be distinct, got {[str(a) for a in found]}")
    return tuple(sorted(found, key=lambda a: (a.version, a.packed)))


NODE_NAME_MAX_BYTES = 63


def _check_node_name(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None and attribute.name == "node":
        return
    if not isinstance(value, str) or (attribute.name != "zone" and not value):
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")
    if len(value.encode()) > NODE_NAME_MAX_BYTES or "\x00" in value:
        raise ValueError(
            f"{attribute.name} must be at most {NODE_NAME_MAX_BYTES} bytes of UTF-8 without "
            f"NUL characters (a Kubernetes node name), got {value!r}"
        )


def _to_addresses(value: Iterable[Any]) -> tuple[Address, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"addresses must be a list of addresses, got {value!r}")
    found = tuple(to_address(item) for item in value)
    for family in (4, 6):
        if sum(1 for a in found if a.version == family) > 1:
            raise ValueError(
                f"addresses must hold at most one IPv{family} address (the node's, as "
                f"Kubernetes' InternalIP), got {[str(a) for a in found]}"
            )
    return found


@attrs.frozen
class Node:
    """The node a datapath serves: its name (Kubernetes' ``nodeName``), its
    addresses (at most one per family: the source a local process's connection
    has before it is bound, which policy and session affinity see, and the
    source external traffic to a backend on another node is SNATed to) and zone.
    NodePorts are served on ``nodeport_addresses``, or on ``addresses``.

    A backend whose ``node`` is this name is local: ``internal_traffic_policy=
    "local"`` services send this node's traffic to those only.
    """

    name: str = attrs.field(validator=_check_node_name)
    addresses: tuple[Address, ...] = attrs.field(default=(), converter=_to_addresses)
    zone: str = attrs.field(default="", validator=_check_node_name)
    nodeport_addresses: tuple[Address, ...] = attrs.field(
        default=(), converter=_to_ip_list, kw_only=True
    )

    def address(self, family: int) -> Address | None:
        return next((a for a in self.addresses if a.version == family), None)

    @property
    def serves_nodeports_on(self) -> tuple[Address, ...]:
        """Where NodePorts answer: ``nodeport_addresses`` (kube-proxy's
        ``--nodeport-addresses``), else the node's ``addresses`` (its default,
        "primary": the node's own IPs)."""
        return self.nodeport_addresses or self.addresses


@attrs.frozen
class Backend:
    """One endpoint a service sends flows to: an address and a port.

    ``weight`` shares new flows in proportion (0: none); ``state`` follows
    Kubernetes' endpoint conditions (see :class:`BackendState`); ``node`` is the
    name of the node it runs on (Kubernetes' endpoint ``nodeName``), for
    ``internal_traffic_policy="local"``.
    """

    address: Address = attrs.field(converter=to_address)
    port: int = attrs.field(validator=_check_port)
    weight: int = attrs.field(default=1, validator=_check_weight, kw_only=False)
    state: BackendState = attrs.field(default=BackendState.ACTIVE, converter=to_state)
    node: str | None = attrs.field(default=None, validator=_check_node_name, kw_only=True)

    def __attrs_post_init__(self) -> None:
        _usable_address("backend address", self.address)

    @property
    def family(self) -> int:
        return self.address.version

    @property
    def endpoint(self) -> tuple[Address, int]:
        """What identifies a backend within a service: its address and port."""
        return (self.address, self.port)

    def __str__(self) -> str:
        return endpoint_text(self.address, self.port)


def _to_backends(value: Iterable[Any]) -> tuple[Backend, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"backends must be a list of Backend, got {value!r}")
    result = []
    for item in value:
        if not isinstance(item, Backend):
            raise ValueError(f"backends must be Backend objects, got {item!r}")
        result.append(item)
    return tuple(result)


AFFINITY_MAX_SECONDS = 86400  # Kubernetes' limit for sessionAffinityConfig
DEFAULT_AFFINITY_SECONDS = 10800  # Kubernetes' default for sessionAffinity: ClientIP


def _check_affinity(
    instance: object, attribute: attrs.Attribute[int | None], value: object
) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= AFFINITY_MAX_SECONDS
    ):
        raise ValueError(
            f"affinity_timeout must be whole seconds from 1 to {AFFINITY_MAX_SECONDS} (None: no "
            f"affinity; Kubernetes' default is {DEFAULT_AFFINITY_SECONDS}), got {value!r}"
        )


def _check_optional_port(
    instance: object, attribute: attrs.Attribute[int | None], value: object
) -> None:
    if value is not None:
        _check_port(instance, attribute, value)  # type: ignore[arg-type]


def _to_networks(value: Iterable[Any]) -> tuple[Network, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"source_ranges must be a list of CIDRs, got {value!r}")
    found: list[Network] = []
    for item in value:
        network = to_network(item)
        if network is None:
            raise ValueError(f"source_ranges must be CIDRs such as '10.0.0.0/8', got {item!r}")
        if network not in found:
            found.append(network)
    return tuple(sorted(found, key=lambda n: (n.version, n.network_address.packed, n.prefixlen)))


def _check_name(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"name must be a string, got {value!r}")
    if len(value.encode()) > NAME_MAX_BYTES:
        raise ValueError(
            f"name must be at most {NAME_MAX_BYTES} bytes of UTF-8, got {len(value.encode())}: "
            f"{value[:40]!r}..."
        )
    if "\x00" in value:
        raise ValueError(f"name must not contain NUL characters, got {value!r}")


@attrs.frozen
class Service:
    """A VIP:port/protocol and the backends its flows are spread over.

    A service with no backends is valid: the datapath refuses its flows the
    way kube-proxy does (a TCP reset, ICMP port unreachable for UDP) instead of
    letting them hang. ``affinity_timeout`` (seconds) is Kubernetes'
    ``sessionAffinity: ClientIP``: new connections from one client address go
    to the backend its last one went to, until that many seconds pass without
    a new connection.

    North-south (kube-proxy's NodePort and LoadBalancer Services): ``node_port``
    is also served on every address the datapath serves NodePorts on,
    ``external_ips`` and ``load_balancer_ips`` (``spec.externalIPs``,
    ``status.loadBalancer.ingress``) on ``port``; each is a frontend of its own
    in the datapath (:meth:`frontends`, :class:`Frontend`), with its own
    counters and events. ``external_traffic_policy="local"`` sends their
    traffic only to this node's backends, client address preserved (none:
    dropped); ``"cluster"`` to any, a backend on another node by SNAT to this
    node's address (``forwarding="dsr"``: by direct server return, see
    :class:`Forwarding`). ``source_ranges`` (``loadBalancerSourceRanges``) admits
    new flows to the load-balancer IPs only from those CIDRs.
    ``health_check_node_port`` (``healthCheckNodePort``) is where
    :class:`pyebpflb.HealthServer` answers for a Local service.
    """

    vip: Address = attrs.field(converter=to_address)
    port: int = attrs.field(validator=_check_port)
    protocol: Protocol = attrs.field(default=Protocol.TCP, converter=to_protocol)
    name: str = attrs.field(default="", validator=_check_name)
    backends: tuple[Backend, ...] = attrs.field(default=(), converter=_to_backends)
    affinity_timeout: int | None = attrs.field(default=None, validator=_check_affinity)
    scheduler: Scheduler = attrs.field(default=Scheduler.RANDOM, converter=to_scheduler)
    internal_traffic_policy: TrafficPolicy = attrs.field(
        default=TrafficPolicy.CLUSTER, converter=to_traffic_policy, kw_only=True
    )
    kind: Frontend = attrs.field(default=Frontend.CLUSTER_IP, converter=to_frontend, kw_only=True)
    node_port: int | None = attrs.field(default=None, validator=_check_optional_port, kw_only=True)
    external_ips: tuple[Address, ...] = attrs.field(default=(), converter=_to_ip_list, kw_only=True)
    load_balancer_ips: tuple[Address, ...] = attrs.field(
        default=(), converter=_to_ip_list, kw_only=True
    )
    external_traffic_policy: TrafficPolicy = attrs.field(
        default=TrafficPolicy.CLUSTER, converter=to_external_policy, kw_only=True
    )
    source_ranges: tuple[Network, ...] = attrs.field(
        default=(), converter=_to_networks, kw_only=True
    )
    health_check_node_port: int | None = attrs.field(
        default=None, validator=_check_optional_port, kw_only=True
    )
    forwarding: Forwarding = attrs.field(
        default=Forwarding.SNAT, converter=to_forwarding, kw_only=True
    )

    def __attrs_post_init__(self) -> None:
        self._check_frontends()
        if self.kind is Frontend.NODE_PORT:
            if not self.vip.is_unspecified:
                raise ValueError(
                    f"a node_port frontend's vip is {'0.0.0.0' if self.vip.version == 4 else '::'}"
                    f" (it is served on the node's addresses), got {self.vip}"
                )
        else:
            _usable_address("vip", self.vip)
        seen: set[tuple[Address, int]] = set()
        for backend in self.backends:
            if backend.family != self.vip.version:
                raise ValueError(
                    f"backend {backend} is IPv{backend.family} but the vip {self.vip} is "
                    f"IPv{self.vip.version}: a service's addresses must be of one family"
                )
            if backend.endpoint in seen:
                raise ValueError(f"backend {backend} is listed twice in service {self.label}")
            seen.add(backend.endpoint)

    def _check_frontends(self) -> None:
        family = self.vip.version
        for what, addresses in (
            ("external_ips", self.external_ips),
            ("load_balancer_ips", self.load_balancer_ips),
        ):
            for address in addresses:
                if address.version != family:
                    raise ValueError(
                        f"{what} address {address} is IPv{address.version} but the vip "
                        f"{self.vip} is IPv{family}: one Service per family (Kubernetes' "
                        "dual-stack Services are one per ipFamily here)"
                    )
        makes = self.node_port is not None or self.external_ips or self.load_balancer_ips
        if self.kind.external and makes:
            raise ValueError(
                f"a {self.kind.value} frontend is one of its Service's frontends: node_port, "
                "external_ips and load_balancer_ips belong to the Service's cluster_ip entry"
            )
        external = self.kind.external or makes
        if not external:
            for what, value, none in (
                ("external_traffic_policy", self.external_traffic_policy, TrafficPolicy.CLUSTER),
                ("health_check_node_port", self.health_check_node_port, None),
                ("forwarding", self.forwarding, Forwarding.SNAT),
            ):
                if value != none:
                    raise ValueError(
                        f"{what} applies to external traffic, and service {self.label} has no "
                        "node_port, external_ips or load_balancer_ips"
                    )
        lb = self.load_balancer_ips or self.kind is Frontend.LOAD_BALANCER
        if self.source_ranges and not lb:
            raise ValueError(
                f"source_ranges restrict the load-balancer IPs, and service {self.label} has "
                "no load_balancer_ips"
            )
        for network in self.source_ranges:
            if network.version != family:
                raise ValueError(
                    f"source range {network} is IPv{network.version} but the vip {self.vip} is "
                    f"IPv{family}"
                )
        if (
            self.health_check_node_port is not None
            and self.external_traffic_policy is not TrafficPolicy.LOCAL
        ):
            raise ValueError(
                "health_check_node_port is for external_traffic_policy 'local' (kube-proxy "
                f"answers on it for Local services only), service {self.label} is 'cluster'"
            )

    @property
    def key(self) -> tuple[Address, int, Protocol]:
        """What identifies a service in the datapath: (vip, port, protocol)."""
        return (self.vip, self.port, self.protocol)

    @property
    def label(self) -> str:
        host = "*" if self.kind is Frontend.NODE_PORT else host_text(self.vip)
        where = f"{host}:{self.port}/{self.protocol.value}"
        if self.kind is not Frontend.CLUSTER_IP:
            where += f" {self.kind.value.replace('_', '')}"
        return f"{self.name} ({where})" if self.name else where

    @property
    def north_south(self) -> bool:
        """Has frontends besides its ClusterIP (it stands for several datapath entries)."""
        return bool(self.node_port is not None or self.external_ips or self.load_balancer_ips)

    def frontends(self) -> tuple[Service, ...]:
        """The datapath entries this Service is: itself when it has only its ClusterIP;
        else its ClusterIP entry, a NodePort entry (vip ``0.0.0.0`` or ``::``), one
        per external IP and one per load-balancer IP, in that order."""
        if not self.north_south:
            return (self,)
        cluster = attrs.evolve(
            self,
            node_port=None,
            external_ips=(),
            load_balancer_ips=(),
            external_traffic_policy=TrafficPolicy.CLUSTER,
            source_ranges=(),
            health_check_node_port=None,
            forwarding=Forwarding.SNAT,
        )
        fields = self._external_fields()
        found = [cluster]
        if self.node_port is not None:
            unspecified = ipaddress.ip_address("0.0.0.0" if self.vip.version == 4 else "::")
            found.append(
                attrs.evolve(
                    cluster, vip=unspecified, port=self.node_port, kind=Frontend.NODE_PORT, **fields
                )
            )
        found += [
            attrs.evolve(cluster, vip=a, kind=Frontend.EXTERNAL_IP, **fields)
            for a in self.external_ips
        ]
        found += [
            attrs.evolve(
                cluster,
                vip=a,
                kind=Frontend.LOAD_BALANCER,
                source_ranges=self.source_ranges,
                **fields,
            )
            for a in self.load_balancer_ips
        ]
        return tuple(found)

    def _external_fields(self) -> dict[str, Any]:
        return {
            "internal_traffic_policy": TrafficPolicy.CLUSTER,  # not theirs: the ClusterIP's
            "external_traffic_policy": self.external_traffic_policy,
            "health_check_node_port": self.health_check_node_port,
            "forwarding": self.forwarding,
        }

    def _repr_html_(self) -> str:
        from pyebpflb import _html

        rows = [(str(b), b.weight, b.state.value) for b in self.backends]
        caption = f"{self.label}, scheduler {self.scheduler.value}" + (
            f", affinity {self.affinity_timeout} s" if self.affinity_timeout else ""
        )
        return _html.table(["backend", "weight", "state"], rows, caption)

    def with_backends(self, backends: Iterable[Backend]) -> Service:
        return attrs.evolve(self, backends=tuple(backends))

    def usable_backends(self, node: str | None = None) -> tuple[Backend, ...]:
        """The backends new flows go to: the active ones with weight, or, when there are
        none, the terminating ones with weight (Kubernetes' fallback). Under
        ``internal_traffic_policy="local"`` (an external frontend: ``external_traffic_
        policy``) only those on ``node`` (the datapath's), with the same fallback among
        them, as kube-proxy's CategorizeEndpoints."""
        return tuple(self.backends[i] for i in self.usable_positions(node))

    def usable_positions(self, node: str | None = None) -> list[int]:
        """Where the :meth:`usable_backends` stand in ``backends``."""
        policy = (
            self.external_traffic_policy if self.kind.external else self.internal_traffic_policy
        )
        local = policy is TrafficPolicy.LOCAL
        if local and node is None:
            return []
        for state in (BackendState.ACTIVE, BackendState.TERMINATING):
            chosen = [
                i
                for i, b in enumerate(self.backends)
                if b.state is state and b.weight > 0 and (not local or b.node == node)
            ]
            if chosen:
                return chosen
        return []


ServiceKey = tuple[Address, int, "Protocol"]


def assemble(entries: Iterable[tuple[Service, ServiceKey | None]]) -> list[Service]:
    """Services from datapath entries (each with the key of the ClusterIP entry it was
    made with, or None): the inverse of :meth:`Service.frontends`, in entry order.
    An entry whose ClusterIP entry is not among them stands alone."""
    listed = list(entries)
    groups: dict[ServiceKey, list[Service]] = {}
    for service, origin in listed:
        if origin is not None and origin != service.key:
            groups.setdefault(origin, []).append(service)
    bases = {service.key for service, _ in listed}
    found = []
    for service, origin in listed:
        if origin is not None and origin != service.key and origin in bases:
            continue  # part of its ClusterIP entry's Service
        members = groups.get(service.key, [])
        if not members or service.kind.external:
            found.append(service)
            continue
        node_port = next((m.port for m in members if m.kind is Frontend.NODE_PORT), None)
        one = members[0]
        found.append(
            attrs.evolve(
                service,
                node_port=node_port,
                external_ips=[m.vip for m in members if m.kind is Frontend.EXTERNAL_IP],
                load_balancer_ips=[m.vip for m in members if m.kind is Frontend.LOAD_BALANCER],
                source_ranges=next(
                    (m.source_ranges for m in members if m.kind is Frontend.LOAD_BALANCER), ()
                ),
                external_traffic_policy=one.external_traffic_policy,
                health_check_node_port=one.health_check_node_port,
                forwarding=one.forwarding,
            )
        )
    return found


# -- network policy ------------------------------------------------------------------


class Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


class Direction(enum.StrEnum):
    """``INGRESS``: packets entering through an attached interface (the peer is
    their source). ``EGRESS``: packets leaving through it (the peer is their
    destination)."""

    INGRESS = "ingress"
    EGRESS = "egress"


class Verdict(enum.StrEnum):
    """What the datapath did with a packet: ``FORWARDED`` (translated to a backend),
    ``PASSED`` (not for a service, let through), ``REFUSED`` (a service without
    backends: a reset or ICMP unreachable went back), ``DROPPED``; and what policy
    said of it: ``ALLOWED``, ``DENIED``."""

    FORWARDED = "forwarded"
    PASSED = "passed"
    REFUSED = "refused"
    DROPPED = "dropped"
    ALLOWED = "allowed"
    DENIED = "denied"


class RuleProtocol(enum.Enum):
    """What a rule matches: TCP, UDP, SCTP, ICMP (ICMP for IPv4, ICMPv6 for IPv6) or
    any IP protocol, unknown ones included."""

    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"
    ICMP = "icmp"
    ANY = "any"


PORTED = (RuleProtocol.TCP, RuleProtocol.UDP, RuleProtocol.SCTP)  # rules of these name ports


def to_action(value: object) -> Action:
    return _member(Action, "action", value)


def to_default(value: object) -> Action:
    return _member(Action, "default", value)


def to_direction(value: object) -> Direction:
    return _member(Direction, "direction", value)


def to_rule_protocol(value: object) -> RuleProtocol:
    return _member(RuleProtocol, "protocol", value)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PORT_RANGE_ALL = (0, 65535)  # what ports=None matches (port 0 too)


def to_network(value: object) -> Network | None:
    """A CIDR from a string or an ``ipaddress`` network (an address is its /32 or /128)."""
    if value is None or isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ipaddress.ip_network(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"cidr must be an IPv4 or IPv6 CIDR such as '10.0.0.0/8', got {value!r}")
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError:
        try:
            loose = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(
                f"cidr {value!r} is not an IPv4 or IPv6 CIDR (e.g. '10.0.0.0/8' or 'fd00::/64')"
            ) from None
        raise ValueError(
            f"cidr {value!r} has host bits set; the network is {str(loose)!r}"
        ) from None


def to_ports(value: object) -> tuple[int, int] | None:
    """``None`` (every port), one port, or an inclusive ``(low, high)`` range."""
    if value is None:
        return None

    def port(item: object) -> int:
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 65535:
            raise ValueError(
                f"ports must be a port from 1 to 65535 or a (low, high) range of them, "
                f"got {value!r}"
            )
        return item

    if isinstance(value, int):
        return (port(value), port(value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        low, high = port(value[0]), port(value[1])
        if low > high:
            raise ValueError(f"ports range {value!r} is empty: low {low} > high {high}")
        return (low, high)
    raise ValueError(
        f"ports must be a port from 1 to 65535 or a (low, high) range of them, got {value!r}"
    )


def _check_service_ref(
    instance: object, attribute: attrs.Attribute[str | None], value: object
) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value:
        raise ValueError(f"service must be the name of a service, got {value!r}")
    _check_name(instance, attribute, value)


RULE_ORIGIN_MAX_BYTES = 63  # char origin[64] of struct pyebpflb_policy_rule


def _check_origin(instance: object, attribute: attrs.Attribute[str | None], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value or not value.isprintable():
        raise ValueError(
            f"origin must be a printable line saying where a rule comes from (e.g. "
            f"'ingress rule 1'), got {value!r}"
        )
    if len(value.encode()) > RULE_ORIGIN_MAX_BYTES:
        raise ValueError(
            f"origin must be at most {RULE_ORIGIN_MAX_BYTES} bytes of UTF-8, got "
            f"{len(value.encode())}: {value[:40]!r}..."
        )


@attrs.frozen
class Rule:
    """Allow or deny traffic with a peer in ``cidr`` (``None``: every IPv4 and
    IPv6 address), of ``protocol``, to destination ``ports`` (``None``: all;
    only for TCP and UDP).

    With ``service`` (a service name), the rule applies to packets addressed
    to that service's VIP:port, before translation, like Kubernetes'
    ``loadBalancerSourceRanges``; without it, to the real destination after
    translation. See docs/policy.md for how rules combine.

    ``origin`` says where the rule comes from, for people reading verdicts (a
    NetworkPolicy's translation sets "ingress rule 1": the rule's index in the
    NetworkPolicy's ``spec.ingress``). It is kept in the datapath with the rule, so
    flow events and ``explain`` name it in any process; it changes no verdict.
    """

    action: Action = attrs.field(converter=to_action)
    cidr: Network | None = attrs.field(default=None, converter=to_network)
    protocol: RuleProtocol = attrs.field(default=RuleProtocol.ANY, converter=to_rule_protocol)
    ports: tuple[int, int] | None = attrs.field(default=None, converter=to_ports)
    service: str | None = attrs.field(default=None, validator=_check_service_ref)
    origin: str | None = attrs.field(default=None, validator=_check_origin, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if self.ports is not None and self.protocol not in PORTED:
            raise ValueError(
                f"ports {self.ports} need protocol 'tcp', 'udp' or 'sctp', got protocol "
                f"{self.protocol.value!r} (one rule per protocol)"
            )

    @property
    def prefixlen(self) -> int:
        return self.cidr.prefixlen if self.cidr is not None else 0

    @property
    def port_range(self) -> tuple[int, int]:
        return self.ports if self.ports is not None else PORT_RANGE_ALL

    def matches_family(self, family: int) -> bool:
        return self.cidr is None or self.cidr.version == family

    def __str__(self) -> str:
        parts = [self.action.value, str(self.cidr) if self.cidr is not None else "any address"]
        if self.protocol is not RuleProtocol.ANY:
            parts.append(self.protocol.value)
        if self.ports is not None:
            low, high = self.ports
            parts.append(f"port {low}" if low == high else f"ports {low}-{high}")
        if self.service is not None:
            parts.append(f"to service {self.service}")
        return " ".join(parts)


def _to_rules(value: Iterable[Any]) -> tuple[Rule, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"rules must be a list of Rule, got {value!r}")
    rules = tuple(value)
    for item in rules:
        if not isinstance(item, Rule):
            raise ValueError(f"rules must be Rule objects, got {item!r}")
    return rules


def _to_subjects(value: object) -> tuple[Network, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(
            f"subjects must be a list of addresses or CIDRs (the endpoints the policy is "
            f"for), got {value!r}"
        )
    found = []
    for item in value:
        network = to_network(item)
        if network is None:
            raise ValueError("subjects must be addresses or CIDRs, got None among them")
        found.append(network)
    return tuple(sorted(set(found), key=lambda n: (n.version, n)))


def _check_policy_name(instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"policy name must be a non-empty string, got {value!r}")
    _check_name(instance, attribute, value)


@attrs.frozen
class Policy:
    """Rules for one direction of traffic through the attached interfaces.

    ``default="deny"`` drops what no rule allows (replies of allowed
    connections excepted); ``"allow"`` passes it. Every policy of a direction
    is one rule set: the direction denies by default when any of its policies
    does. Precedence (docs/policy.md): deny beats allow; among allows or
    among denies the most specific prefix wins.

    ``subjects`` (addresses or CIDRs): the endpoints the policy is for, as a
    NetworkPolicy's selected pods. Its ingress rules then police traffic *to* them
    (the real destination, after translation), its egress rules traffic *from* them,
    and only policies whose subjects hold an endpoint apply to it: it is isolated
    (default deny) in a direction when one of those denies by default, others are
    untouched. No subjects: the policy is for every endpoint, as before.
    """

    name: str = attrs.field(validator=_check_policy_name)
    rules: tuple[Rule, ...] = attrs.field(default=(), converter=_to_rules)
    default: Action = attrs.field(default=Action.ALLOW, converter=to_default)
    direction: Direction = attrs.field(default=Direction.INGRESS, converter=to_direction)
    subjects: tuple[Network, ...] = attrs.field(default=(), converter=_to_subjects, kw_only=True)

    def __attrs_post_init__(self) -> None:
        # The first rule naming a service is the one refused, with the first reason.
        for index, rule in enumerate(self.rules):
            if rule.service is None:
                continue
            if self.subjects:
                raise ValueError(
                    f"policy {self.name!r} rule {index} ({rule}) names service "
                    f"{rule.service!r}, but a policy with subjects polices the real "
                    "endpoints, after translation: name no service, or drop subjects"
                )
            if self.direction is Direction.EGRESS:
                raise ValueError(
                    f"policy {self.name!r} rule {index} ({rule}) names service "
                    f"{rule.service!r}, but service rules apply to traffic addressed to "
                    "a VIP, which arrives on ingress: use direction='ingress'"
                )

    def selects(self, address: Address) -> bool:
        """Is the endpoint at ``address`` one this policy is for?"""
        return not self.subjects or any(
            s.version == address.version and address in s for s in self.subjects
        )

    def evaluate(self, packet: Any, **context: Any) -> Any:
        """This policy's verdict on ``packet`` (a :class:`pyebpflb.policy.Packet`);
        see :func:`pyebpflb.policy.evaluate`."""
        from pyebpflb import policy

        return policy.evaluate([self], packet, **context)
