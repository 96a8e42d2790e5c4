"""Commands that read a datapath's state: status, services, backends, conntrack, maps."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any

import click

from pyebpflb.cli.base import (
    OUTPUT,
    Context,
    emit,
    main_group,
    pass_context,
    service_dict,
    table,
)


@main_group.command()
@OUTPUT
@pass_context
def status(ctx: Context, output: str) -> None:
    """Programs attached, map fill levels, kernel and libbpf versions, features."""
    from pyebpflb._bpf import MapType, ProgramType, features
    from pyebpflb._bpf._libbpf import lib

    with ctx.datapath() as dp:
        where = dp.whereabouts()
        hooks = dp.hooks()
        maps = dp.maps()
        conntrack = dp.conntrack_stats()
        probes = {
            "tc programs": features.has_program_type(ProgramType.SCHED_CLS),
            "xdp programs": features.has_program_type(ProgramType.XDP),
            "ring buffer": features.has_map_type(MapType.RINGBUF),
            "lpm trie": features.has_map_type(MapType.LPM_TRIE),
            "map in map": features.has_map_type(MapType.HASH_OF_MAPS),
        }
        data = {
            "datapath": dp.name,
            "netns": dp.netns,
            "kernel": platform.release(),
            "libbpf": f"{lib.libbpf_major_version()}.{lib.libbpf_minor_version()}",
            "layout": where.layout,
            "state": where.state,
            "pin_dir": where.pin_dir if where.pins else None,
            "missing_pins": list(where.missing_pins),
            "writer": where.writer,
            "node": dp.node.name if dp.node is not None else None,
            "cgroups": list(where.cgroups),
            "services": len(dp.services),
            "policies": len(dp.policies),
            "attached": [
                {"interface": h.interface, "hook": h.hook, "program": h.program, "id": h.program_id}
                for h in hooks
            ],
            "maps": [
                {"name": m.name, "entries": m.entries, "max_entries": m.max_entries} for m in maps
            ],
            "features": probes,
            "conntrack": [t.to_dict() for t in conntrack],
        }
    if output == "json":
        emit(output, data, lambda: ([], []))
        return
    click.echo(f"datapath   {data['datapath']}" + (f" (netns {dp.netns})" if dp.netns else ""))
    click.echo(f"layout     {where.layout}")
    click.echo(f"state      {where.state}" + (f" in {where.pin_dir}" if where.pins else ""))
    click.echo(f"writer     {f'pid {where.writer}' if where.writer else 'none (unlocked)'}")
    if where.missing_pins:
        click.echo(
            f"warning    {len(where.missing_pins)} maps have no pin: "
            + ", ".join(where.missing_pins),
            err=True,
        )
    click.echo(f"kernel     {data['kernel']}")
    click.echo(f"libbpf     {data['libbpf']}")
    click.echo(f"node       {data['node'] or 'none given'}")
    click.echo(f"cgroups    {', '.join(where.cgroups) or 'none (no socket-level balancing)'}")
    click.echo(f"services   {data['services']}")
    click.echo(f"policies   {data['policies']}")
    click.echo("features   " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in probes.items()))
    click.echo("\nattached:")
    click.echo(
        table(
            [(h.interface, h.hook, h.program, h.program_id) for h in hooks],
            ["interface", "hook", "program", "id"],
        )
        if hooks
        else "  (nowhere)"
    )
    click.echo("\nconntrack:")
    click.echo(table(_ct_rows(conntrack), _CT_HEADER))
    click.echo("\nmaps:")
    click.echo(
        table(
            [(m.name, _fill(m.entries, m.max_entries), m.max_entries) for m in maps],
            ["map", "used", "max"],
        )
    )


def _fill(entries: int | None, most: int) -> str:
    if entries is None:
        return "-"
    return f"{entries} ({100 * entries / most:.1f}%)" if most else str(entries)


# -- services ------


@main_group.group()
def service() -> None:
    """Services the datapath balances."""


@service.command("list")
@OUTPUT
@pass_context
def service_list(ctx: Context, output: str) -> None:
    """Every frontend (a ClusterIP, a NodePort, an external or load-balancer IP): address,
    port, protocol, backends."""
    with ctx.datapath() as dp:
        services = dp.frontends
    emit(
        output,
        [service_dict(s) for s in services],
        lambda: (
            [
                (
                    s.name or "-",
                    f"{s.label.rsplit(' (', 1)[-1].rstrip(')')}",
                    s.scheduler.value,
                    len(s.backends),
                    ", ".join(str(b) for b in s.backends) or "(none)",
                )
                for s in services
            ],
            ["name", "frontend", "scheduler", "backends", "endpoints"],
        ),
    )


@service.command("get")
@click.argument("name")
@OUTPUT
@pass_context
def service_get(ctx: Context, name: str, output: str) -> None:
    """The frontends of the services named NAME (one per port and frontend), with
    backends and counters."""
    with ctx.datapath() as dp:
        chosen = [s for s in dp.frontends if s.name == name]
        if not chosen:
            known = ", ".join(sorted({s.name for s in dp.services if s.name})) or "none"
            raise click.ClickException(f"no service named {name!r} (services: {known})")
        stats = [dp.stats(s) for s in chosen]
    data = []
    for svc, st in zip(chosen, stats, strict=True):
        entry = service_dict(svc)
        entry["packets"], entry["bytes"] = st.packets, st.bytes
        entry["reply_packets"], entry["reply_bytes"] = st.replies.packets, st.replies.bytes
        for b, info in zip(svc.backends, entry["backends"], strict=True):
            info["packets"], info["bytes"] = st.backends[b].packets, st.backends[b].bytes
            replies = st.backend_replies.get(b)
            info["reply_packets"] = replies.packets if replies else 0
            info["reply_bytes"] = replies.bytes if replies else 0
        entry["removed_backends"] = [
            {"address": str(b), "packets": t.packets, "bytes": t.bytes}
            for b, t in st.removed_backends.items()
        ]
        data.append(entry)
    if output == "json":
        emit(output, data, lambda: ([], []))
        return
    for svc, st in zip(chosen, stats, strict=True):
        click.echo(
            f"{svc.label}  scheduler {svc.scheduler.value}  affinity {svc.affinity_timeout or '-'}"
        )
        click.echo(
            f"  {st.packets} packets, {st.bytes} bytes; replies {st.replies.packets} packets,"
            f" {st.replies.bytes} bytes"
        )
        rows: list[tuple[object, ...]] = [
            (
                str(b),
                b.weight,
                b.state.value,
                st.backends[b].packets,
                st.backends[b].bytes,
                st.backend_replies[b].packets if b in st.backend_replies else 0,
            )
            for b in svc.backends
        ]
        rows += [
            (str(b), "-", "removed", t.packets, t.bytes, "-")
            for b, t in st.removed_backends.items()
        ]
        click.echo(
            table(rows, ["backend", "weight", "state", "packets", "bytes", "replies"])
            if rows
            else "  (no backends)"
        )


@main_group.group()
def backend() -> None:
    """Backends of every service."""


@backend.command("list")
@OUTPUT
@pass_context
def backend_list(ctx: Context, output: str) -> None:
    """Every backend with its service, weight, state and counters."""
    with ctx.datapath() as dp:
        rows = []
        for svc in dp.services:
            st = dp.stats(svc)
            for b in svc.backends:
                rows.append((svc, b, st.backends[b]))
    emit(
        output,
        [
            {
                "service": svc.name,
                "frontend": f"{svc.vip}:{svc.port}/{svc.protocol.value}",
                "address": str(b.address),
                "port": b.port,
                "weight": b.weight,
                "state": b.state.value,
                "packets": t.packets,
                "bytes": t.bytes,
            }
            for svc, b, t in rows
        ],
        lambda: (
            [
                (str(b), svc.name or svc.label, b.weight, b.state.value, t.packets)
                for svc, b, t in rows
            ],
            ["backend", "service", "weight", "state", "packets"],
        ),
    )


# -- conntrack ------


@main_group.group()
def ct() -> None:
    """Connection tracking entries."""


@ct.command("list")
@click.option(
    "--all", "include_dead", is_flag=True, help="Also the dead entries not yet collected."
)
@OUTPUT
@pass_context
def ct_list(ctx: Context, include_dead: bool, output: str) -> None:
    """Live tracked flows: kind, flow, backend, age, expiry."""
    with ctx.datapath() as dp:
        flows = sorted(dp.flows(include_dead=include_dead), key=lambda f: (f.kind, f.age))
    emit(
        output,
        [f.to_dict() for f in flows],
        lambda: (
            [
                (
                    f.kind,
                    f.protocol,
                    f"{f.source} -> {f.destination}",
                    f.backend,
                    f.service,
                    f"{f.age:.1f}s",
                    f"{f.expires_in:.1f}s" if f.expires_in is not None else None,
                )
                for f in flows
            ],
            ["kind", "proto", "flow", "backend", "service", "age", "expires in"],
        ),
    )


@ct.command("flush")
@OUTPUT
@pass_context
def ct_flush(ctx: Context, output: str) -> None:
    """Forget every tracked flow."""
    with ctx.datapath(writes=True) as dp:
        count = dp.flush_conntrack()
    if output == "json":
        emit(output, {"flushed": count}, lambda: ([], []))
    else:
        click.echo(f"flushed {count} conntrack entries")


@ct.command("gc")
@OUTPUT
@pass_context
def ct_gc(ctx: Context, output: str) -> None:
    """Delete the dead entries now (expired flows, reply halves without their flow)."""
    with ctx.datapath(writes=True) as dp:
        count = dp.collect_garbage()
    if output == "json":
        emit(output, {"collected": count}, lambda: ([], []))
    else:
        click.echo(f"collected {count} dead conntrack entries")


@ct.command("stats")
@OUTPUT
@pass_context
def ct_stats(ctx: Context, output: str) -> None:
    """Each conntrack table: fill level and what happened to its flows."""
    with ctx.datapath() as dp:
        tables = dp.conntrack_stats()
    emit(output, [t.to_dict() for t in tables], lambda: (_ct_rows(tables), _CT_HEADER))


_CT_HEADER = ["table", "used", "max", "created", "confirmed", "orphaned", "healed", "collected"]


def _ct_rows(tables: list[Any]) -> list[Sequence[object]]:
    return [
        (
            t.table,
            _fill(t.entries, t.max_entries),
            t.max_entries,
            t.created,
            t.confirmed,
            t.orphaned,
            t.healed,
            t.collected,
        )
        for t in tables
    ]


# -- bpf map list ------


@main_group.group()
def bpf() -> None:
    """The datapath's BPF objects."""


@bpf.group("map")
def bpf_map() -> None:
    """BPF maps."""


@bpf_map.command("list")
@OUTPUT
@pass_context
def bpf_map_list(ctx: Context, output: str) -> None:
    """Every map: type, entries used / max, pin path."""
    with ctx.datapath() as dp:
        maps = dp.maps()
    emit(
        output,
        [
            {
                "name": m.name,
                "type": m.type,
                "entries": m.entries,
                "max_entries": m.max_entries,
                "pin": m.pin,
            }
            for m in maps
        ],
        lambda: (
            [(m.name, m.type, _fill(m.entries, m.max_entries), m.max_entries, m.pin) for m in maps],
            ["name", "type", "used", "max", "pin"],
        ),
    )


# -- monitor ------
