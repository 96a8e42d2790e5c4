"""Finding a datapath's state and loading the programs over it.

A datapath's maps are pinned under ``pin_root/name/`` (``pin_root/name/netns-<inode>/``
outside the initial network namespace, so datapaths of one name in different
namespaces stay apart) and found again by a later ``Datapath`` of the same name:
through the programs attached to this namespace's interfaces (which works where
the bpffs is not shared: ``ip netns exec`` mounts a new one), else through the
pins. Adopting is a check first (cilium/ebpf's ``MapSpec.Compatible``): a map
of another layout is refused with every difference named, before anything loads.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
from collections.abc import Iterable
from typing import Any

import attrs

from pyebpflb import events, maglev, maps, objects
from pyebpflb._bpf import LoadedObject, Map, OpenObject, ffi, fs
from pyebpflb._bpf._libbpf import lib
from pyebpflb._bpf.netns import current_id, is_initial
from pyebpflb.datapath import migrate
from pyebpflb.datapath.hooks import close_all, filters, maps_by_id, maps_of_program
from pyebpflb.datapath.migrate import LAYOUT_VERSION, Migration
from pyebpflb.datapath.results import ConntrackTimeouts
from pyebpflb.errors import BpfError, IncompatibleDatapath, NotFound, PyEbpfLbError
from pyebpflb.model import Direction

logger = logging.getLogger("pyebpflb")

DEFAULT_HAIRPIN_IPV4 = ipaddress.IPv4Address("169.254.42.1")  # Cilium's service loopback address
DEFAULT_HAIRPIN_IPV6 = ipaddress.IPv6Address("fd00:eb1b:42::1")
_SECOND = 1_000_000_000
# The source ports SNAT takes: above Linux's ephemeral range (32768-60999), so a
# mapping never takes the port of a connection the node itself made.
SNAT_PORTS = (61000, 65535)


@attrs.frozen
class Settings:
    """What a datapath is told at start and keeps in ``lb_config``."""

    ct_timeouts: ConntrackTimeouts
    events: frozenset[str]
    event_rate: int
    maglev_table_size: int
    hairpin: tuple[ipaddress.IPv4Address, ipaddress.IPv6Address] = (
        DEFAULT_HAIRPIN_IPV4,
        DEFAULT_HAIRPIN_IPV6,
    )


def hairpin_addresses(value: object) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """``hairpin_addresses`` checked: an IPv4 and an IPv6 unicast address."""
    right = (
        "an IPv4 and an IPv6 unicast address (neither loopback, multicast nor IPv6 "
        "link-local), e.g. ('169.254.42.1', 'fd00:eb1b:42::1')"
    )
    try:
        v4, v6 = (ipaddress.ip_address(a) for a in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"hairpin_addresses must be {right}, got {value!r}") from exc
    if not isinstance(v4, ipaddress.IPv4Address) or not isinstance(v6, ipaddress.IPv6Address):
        raise ValueError(f"hairpin_addresses must be {right}, got {value!r}")
    for address in (v4, v6):
        if (
            address.is_unspecified
            or address.is_multicast
            or address.is_loopback
            or (address.version == 6 and address.is_link_local)
        ):
            raise ValueError(f"hairpin_addresses must be {right}, got {value!r}")
    return v4, v6


def settings(
    ct_timeouts: object,
    events_wanted: Iterable[str] | None,
    event_rate: object,
    maglev_size: int,
    hairpin: object = (DEFAULT_HAIRPIN_IPV4, DEFAULT_HAIRPIN_IPV6),
) -> Settings:
    """The constructor's settings, checked."""
    if (
        isinstance(event_rate, bool)
        or not isinstance(event_rate, int)
        or not (0 <= event_rate <= 1 << 30)
    ):
        raise ValueError(f"event_rate must be an integer from 0 to {1 << 30}, got {event_rate!r}")
    if not isinstance(ct_timeouts, ConntrackTimeouts):
        raise ValueError(f"ct_timeouts must be a ConntrackTimeouts, got {ct_timeouts!r}")
    return Settings(
        ct_timeouts=ct_timeouts,
        events=events.to_types(events_wanted if events_wanted is not None else ()),
        event_rate=event_rate,
        maglev_table_size=maglev.check_table_size(maglev_size),
        hairpin=hairpin_addresses(hairpin),
    )


def pin_dir_for(pin_base: str, name: str) -> str:
    """Where datapath ``name`` of this network namespace keeps its pins: under
    ``pin_base`` (``fs.lasting(pin_root)``: as the host sees it), a folder per namespace."""
    base = os.path.join(pin_base, name)
    return base if is_initial() else os.path.join(base, f"netns-{current_id()}")


def find_existing(name: str, pin_dir: str) -> dict[str, Map]:
    """The maps of datapath ``name`` in this namespace, by name (empty: none)."""
    return _find_attached(name) or _find_pinned(name, pin_dir)


def _find_attached(name: str) -> dict[str, Map]:
    """The maps of our programs attached here; lb_config lists the ids of all maps."""
    for found in filters([Direction.INGRESS]):
        used = maps_of_program(found.prog_id)
        config = config_if_named(used, name)
        held = {m.id for m in used.values()}
        close_all(used)
        if config is not None:
            # Our programs hold every map (lib/keep.h) since layout 4, and lb_config
            # lists the first PYEBPFLB_LB_MAPS_MAX (all of layout 3's); one gone is
            # reported by name when the object is checked against this version's.
            listed = {int(i) for i in config.map_ids if i}
            return maps_by_id(sorted(listed | held), skip_gone=True)
    return {}


def _find_pinned(name: str, pin_dir: str) -> dict[str, Map]:
    if fs.fs_type(pin_dir) != "bpf" or not os.path.isdir(pin_dir):
        return {}
    found = {}
    for entry in os.listdir(pin_dir):
        path = os.path.join(pin_dir, entry)
        if entry.startswith("lb_") and not os.path.isdir(path):
            found[entry] = Map.from_pinned(path)
    if found and config_if_named(found, name) is None:
        close_all(found)
        raise PyEbpfLbError(
            f"the pins in {pin_dir} are not datapath {name!r}'s (another pyebpflb "
            "version's?); remove that folder or destroy() that datapath with its version"
        )
    return found


def config_if_named(found: dict[str, Map], name: str) -> Any:
    """The config of ``found`` (maps by name) if it is datapath ``name``'s: it names it."""
    config_map = found.get(maps.CONFIG)
    config = None if config_map is None else migrate.read_config(config_map)
    if config is None:
        return None
    return config if ffi.string(config.name).decode(errors="replace") == name else None


def older_layout(existing: dict[str, Map], name: str) -> int | None:
    """The layout of ``existing`` when it is older than this version's (an upgrade)."""
    config = config_if_named(existing, name) if existing else None
    if config is None:
        return None
    layout = int(config.layout_version)
    return layout if 0 < layout < LAYOUT_VERSION else None


def missing(name: str, netns: str | None, pin_dir: str) -> NotFound:
    where = f" in network namespace {netns!r}" if netns else ""
    return NotFound(
        errno.ENOENT,
        f"no datapath {name!r}{where}: none of its programs is attached here and "
        f"nothing is pinned under {pin_dir}",
    )


def load(
    name: str, sizes: dict[str, int], existing: dict[str, Map], pin_dir: str = ""
) -> tuple[LoadedObject, list[Migration]]:
    """The lb object loaded over ``existing`` maps (which it closes), the rest sized,
    and the migrations it went through when ``existing`` is of an older layout (their
    first halves done: the caller swaps the programs, then runs their ``after``)."""
    try:
        config = config_if_named(existing, name) if existing else None
        steps = migrate.path(name, int(config.layout_version)) if config is not None else []
        replaced = {m for step in steps for m in step.replaced}
        added = {m for step in steps for m in step.added}
        kept = {k: v for k, v in existing.items() if k not in replaced}
        opened = objects.open_object("lb")
        with opened:
            _check_compatible(opened, name, kept)
            _check_complete(opened, name, existing, pin_dir, added)
            for map_name, size in sizes.items():
                if map_name in kept and kept[map_name].max_entries != size:
                    logger.warning(
                        "pyebpflb: datapath %s keeps %s at %d entries (asked for %d)",
                        name,
                        map_name,
                        kept[map_name].max_entries,
                        size,
                    )
                    size = kept[map_name].max_entries
                opened.set_max_entries(map_name, size)
            for map_name, adopted in kept.items():  # all known: checked above
                opened.reuse_map(map_name, adopted)
            obj = opened.load()
        try:
            old = {k: v for k, v in existing.items() if k in replaced}
            for step in steps:
                step.before(old, obj)
        except BaseException:
            obj.close()
            raise
        return obj, steps
    finally:
        close_all(existing)


def _check_compatible(opened: OpenObject, name: str, existing: dict[str, Map]) -> None:
    known = set(opened.map_names())
    differences = [f"{m}: not a map of this version" for m in sorted(set(existing) - known)]
    for map_name, adopted in sorted(existing.items()):
        if map_name in known:
            differences += opened.map_spec(map_name).differences(adopted)
    if differences:
        raise IncompatibleDatapath(
            f"datapath {name!r} was made by another pyebpflb version; destroy it first "
            f"(pyebpflb --datapath {name} destroy loads nothing, so it works on any version's)",
            differences,
        )


def _check_complete(
    opened: OpenObject, name: str, existing: dict[str, Map], pin_dir: str, added: set[str]
) -> None:
    """An adopted datapath has every map its layout has (this version's, but for the
    maps ``added`` by the migrations since): one that is gone (unpinned while no
    program held it) took its state with it, and a fresh empty one in its place
    would serve without it, so adoption refuses."""
    if not existing:
        return
    gone = sorted(set(opened.map_names()) - added - set(existing))
    if gone:
        where = f"no pin under {pin_dir} and " if pin_dir else ""
        raise IncompatibleDatapath(
            f"datapath {name!r} is incomplete, its state cannot be trusted; destroy it "
            f"(pyebpflb --datapath {name} destroy) and make it again",
            [f"{m}: missing ({where}no attached program holds it)" for m in gone],
        )


def pin_maps(obj: LoadedObject, pin_dir: str) -> None:
    """Pin every map under ``pin_dir``. A pin there that holds another map (the map an
    upgrade replaced, left by an upgrade that was interrupted) is replaced: the
    folder is this datapath's, and its maps are the ones in force."""
    fs.ensure_bpffs(os.path.dirname(pin_dir))
    os.makedirs(pin_dir, mode=0o700, exist_ok=True)
    for map_name, bpf_map in obj.maps.items():
        path = os.path.join(pin_dir, map_name)
        if os.path.exists(path):
            if _pinned_id(path) == bpf_map.id:
                continue
            os.unlink(path)
        bpf_map.pin(path)


def _pinned_id(path: str) -> int | None:
    try:
        with Map.from_pinned(path) as pinned:
            return pinned.id
    except (BpfError, OSError):
        return None


def write_config(
    obj: LoadedObject, name: str, wanted: Settings, *, adopted: bool, keep: bool
) -> Settings:
    """Write ``wanted`` (or with ``keep``, what an adopted datapath has) into lb_config;
    returns the settings in force."""
    config_map = obj.map(maps.CONFIG)
    config = config_map[0]  # an older layout's was migrated to this one's by load()
    settings = _settings_of(config, wanted) if adopted and keep else wanted
    stored = int(config.maglev_table_size)
    if adopted and stored and stored != settings.maglev_table_size:
        # The installed tables have the size they were built with.
        logger.warning(
            "pyebpflb: datapath %s keeps Maglev tables of %d slots (asked for %d)",
            name,
            stored,
            settings.maglev_table_size,
        )
        settings = attrs.evolve(settings, maglev_table_size=stored)
    config.layout_version = LAYOUT_VERSION
    config.name = name.encode()
    timeouts = settings.ct_timeouts
    config.ct_tcp_syn_ns = int(timeouts.tcp_syn * _SECOND)
    config.ct_tcp_established_ns = int(timeouts.tcp_established * _SECOND)
    config.ct_tcp_closing_ns = int(timeouts.tcp_closing * _SECOND)
    config.ct_udp_ns = int(timeouts.udp * _SECOND)
    # SNAT mappings live as long as the flows they carry would (lib/nodeport.h).
    config.snat_tcp_ns = int(timeouts.tcp_established * _SECOND)
    config.snat_udp_ns = int(timeouts.udp * _SECOND)
    config.snat_port_min, config.snat_port_max = SNAT_PORTS
    for counter in ("next_service_id", "next_backend_id", "next_rule_id", "next_policy_id"):
        setattr(config, counter, max(int(getattr(config, counter)), 1))
    config.maglev_table_size = settings.maglev_table_size
    config.event_mask = sum(events.TYPE_BITS[t] for t in settings.events)
    config.event_rate = settings.event_rate
    hairpin_v4, hairpin_v6 = settings.hairpin
    ffi.memmove(config.hairpin_v4.bytes, maps.addr_bytes(hairpin_v4), 16)
    ffi.memmove(config.hairpin_v6.bytes, maps.addr_bytes(hairpin_v6), 16)
    # The list has room for layout 3's maps and a few more (its size is the config's
    # layout); the programs hold every map, later layouts' too (lib/keep.h).
    ids = [m.id for m in obj.maps.values()][: len(config.map_ids)]
    config.map_ids[0 : len(ids)] = ids
    config_map[0] = config
    return settings


def _settings_of(config: Any, wanted: Settings) -> Settings:
    """An adopted datapath's settings, as its config holds them."""
    return Settings(
        ct_timeouts=ConntrackTimeouts(
            tcp_syn=int(config.ct_tcp_syn_ns) / _SECOND,
            tcp_established=int(config.ct_tcp_established_ns) / _SECOND,
            tcp_closing=int(config.ct_tcp_closing_ns) / _SECOND,
            udp=int(config.ct_udp_ns) / _SECOND,
        ),
        events=frozenset(
            name for name, bit in events.TYPE_BITS.items() if int(config.event_mask) & bit
        ),
        event_rate=int(config.event_rate),
        maglev_table_size=int(config.maglev_table_size) or wanted.maglev_table_size,
        hairpin=_hairpin_of(config) or wanted.hairpin,
    )


def _hairpin_of(config: Any) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address] | None:
    v4 = maps.addr_from(config.hairpin_v4, int(lib.PYEBPFLB_IPV4))
    v6 = maps.addr_from(config.hairpin_v6, int(lib.PYEBPFLB_IPV6))
    assert isinstance(v4, ipaddress.IPv4Address) and isinstance(v6, ipaddress.IPv6Address)
    return None if v4.is_unspecified else (v4, v6)
