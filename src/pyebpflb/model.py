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


class Protocol(enum.Enum):
    TCP = "tcp"
    UDP = "udp"

    @property
    def number(self) -> int:
        """The IP protocol number (IPPROTO_TCP, IPPROTO_UDP)."""
        return 6 if self is Protocol.TCP else 17

    @classmethod
    def from_number(cls, number: int) -> Protocol:
        return {6: cls.TCP, 17: cls.UDP}[number]


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


@attrs.frozen
class Backend:
    """One endpoint a service sends flows to: an address and a port.

    ``weight`` shares new flows in proportion (0: none); ``state`` follows
    Kubernetes' endpoint conditions (see :class:`BackendState`).
    """

    address: Address = attrs.field(converter=to_address)
    port: int = attrs.field(validator=_check_port)
    weight: int = attrs.field(default=1, validator=_check_weight, kw_only=False)
    state: BackendState = attrs.field(default=BackendState.ACTIVE, converter=to_state)

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
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


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


def _check_name(instance: object, attribute: attrs.Attribute[str], value: object) -> None:
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
    """

    vip: Address = attrs.field(converter=to_address)
    port: int = attrs.field(validator=_check_port)
    protocol: Protocol = attrs.field(default=Protocol.TCP, converter=to_protocol)
    name: str = attrs.field(default="", validator=_check_name)
    backends: tuple[Backend, ...] = attrs.field(default=(), converter=_to_backends)
    affinity_timeout: int | None = attrs.field(default=None, validator=_check_affinity)
    scheduler: Scheduler = attrs.field(default=Scheduler.RANDOM, converter=to_scheduler)

    def __attrs_post_init__(self) -> None:
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

    @property
    def key(self) -> tuple[Address, int, Protocol]:
        """What identifies a service in the datapath: (vip, port, protocol)."""
        return (self.vip, self.port, self.protocol)

    @property
    def label(self) -> str:
        host = f"[{self.vip}]" if self.vip.version == 6 else str(self.vip)
        where = f"{host}:{self.port}/{self.protocol.value}"
        return f"{self.name} ({where})" if self.name else where

    def with_backends(self, backends: Iterable[Backend]) -> Service:
        return attrs.evolve(self, backends=tuple(backends))

    def usable_backends(self) -> tuple[Backend, ...]:
        """The backends new flows go to: the active ones with weight, or, when there are
        none, the terminating ones with weight (Kubernetes' fallback)."""
        return tuple(self.backends[i] for i in self.usable_positions())

    def usable_positions(self) -> list[int]:
        """Where the :meth:`usable_backends` stand in ``backends``."""
        for state in (BackendState.ACTIVE, BackendState.TERMINATING):
            chosen = [i for i, b in enumerate(self.backends) if b.state is state and b.weight > 0]
            if chosen:
                return chosen
        return []
