"""The ``pyebpflb`` command: look at and drive a persisted datapath by name.

Human tables by default, ``-o json`` for scripts. Every command but ``demo``
and ``apply`` needs the datapath to exist (``--datapath``, default
"default"; ``--netns`` to reach one in another network namespace).
"""

from __future__ import annotations

import json
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from pyebpflb.datapath import Datapath

OUTPUT = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True
)


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    cells = [[str(h).upper() for h in header]] + [
        ["-" if c is None else str(c) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def emit(
    output: str, data: Any, rows: Callable[[], tuple[list[Sequence[object]], list[str]]]
) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        body, header = rows()
        click.echo(table(body, header))


class Context:
    def __init__(self, name: str, netns: str | None, pin_root: str | None) -> None:
        self.name = name
        self.netns = netns
        self.pin_root = pin_root

    @contextmanager
    def datapath(self, *, create: bool = False) -> Iterator[Datapath]:
        from pyebpflb.datapath import DEFAULT_PIN_ROOT, Datapath
        from pyebpflb.errors import PyEbpfLbError

        try:
            dp = Datapath(
                self.name,
                persist=True,
                create=create,
                netns=self.netns,
                pin_root=self.pin_root or DEFAULT_PIN_ROOT,
            )
        except (PyEbpfLbError, PermissionError, ValueError) as exc:  # NotFound among them
            raise click.ClickException(str(exc)) from None
        try:
            yield dp
        except (ValueError, PyEbpfLbError) as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            dp.close()


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--datapath", "name", default="default", show_default=True, help="datapath name")
@click.option("--netns", default=None, help="network namespace of the datapath (ip netns name)")
@click.option("--pin-root", default=None, help="bpffs folder of the pins [/sys/fs/bpf/pyebpflb]")
@click.pass_context
def main_group(ctx: click.Context, name: str, netns: str | None, pin_root: str | None) -> None:
    """Kubernetes-style service load balancing and policy in the kernel with eBPF."""
    ctx.obj = Context(name, netns, pin_root)


@main_group.command()
def demo() -> None:
    """Build a sandbox and balance a service through it (what `make demo` runs)."""
    from pyebpflb.testing import demo as story

    sys.exit(story.run())


# -- status ------


@main_group.command()
@OUTPUT
@pass_context
def status(ctx: Context, output: str) -> None:
    """Programs attached, map fill levels, kernel and libbpf versions, features."""
    from pyebpflb._bpf import MapType, ProgramType, features
    from pyebpflb._bpf._libbpf import lib

    with ctx.datapath() as dp:
        hooks = dp.hooks()
        maps = dp.maps()
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
        }
    if output == "json":
        emit(output, data, lambda: ([], []))
        return
    click.echo(f"datapath   {data['datapath']}" + (f" (netns {dp.netns})" if dp.netns else ""))
    click.echo(f"kernel     {data['kernel']}")
    click.echo(f"libbpf     {data['libbpf']}")
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


def _service_dict(svc: Any) -> dict[str, Any]:
    return {
        "name": svc.name,
        "vip": str(svc.vip),
        "port": svc.port,
        "protocol": svc.protocol.value,
        "scheduler": svc.scheduler.value,
        "affinity_timeout": svc.affinity_timeout,
        "backends": [
            {
                "address": str(b.address),
                "port": b.port,
                "weight": b.weight,
                "state": b.state.value,
            }
            for b in svc.backends
        ],
    }


@service.command("list")
@OUTPUT
@pass_context
def service_list(ctx: Context, output: str) -> None:
    """Every service: VIP, port, protocol, backends."""
    with ctx.datapath() as dp:
        services = dp.services
    emit(
        output,
        [_service_dict(s) for s in services],
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
    """The services named NAME (one per port), with backends and counters."""
    with ctx.datapath() as dp:
        chosen = [s for s in dp.services if s.name == name]
        if not chosen:
            known = ", ".join(sorted({s.name for s in dp.services if s.name})) or "none"
            raise click.ClickException(f"no service named {name!r} (services: {known})")
        stats = [dp.stats(s) for s in chosen]
    data = []
    for svc, st in zip(chosen, stats, strict=True):
        entry = _service_dict(svc)
        entry["packets"], entry["bytes"] = st.packets, st.bytes
        for b, info in zip(svc.backends, entry["backends"], strict=True):
            info["packets"], info["bytes"] = st.backends[b].packets, st.backends[b].bytes
        data.append(entry)
    if output == "json":
        emit(output, data, lambda: ([], []))
        return
    for svc, st in zip(chosen, stats, strict=True):
        click.echo(
            f"{svc.label}  scheduler {svc.scheduler.value}  affinity {svc.affinity_timeout or '-'}"
        )
        click.echo(f"  {st.packets} packets, {st.bytes} bytes")
        rows = [
            (str(b), b.weight, b.state.value, st.backends[b].packets, st.backends[b].bytes)
            for b in svc.backends
        ]
        click.echo(
            table(rows, ["backend", "weight", "state", "packets", "bytes"])
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
@OUTPUT
@pass_context
def ct_list(ctx: Context, output: str) -> None:
    """Tracked flows: kind, flow, backend, age, expiry."""
    with ctx.datapath() as dp:
        flows = sorted(dp.flows(), key=lambda f: (f.kind, f.age))
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
    with ctx.datapath() as dp:
        count = dp.flush_conntrack()
    if output == "json":
        emit(output, {"flushed": count}, lambda: ([], []))
    else:
        click.echo(f"flushed {count} conntrack entries")


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


@main_group.command()
@click.option("--type", "types", multiple=True, type=click.Choice(["trace", "drop", "policy"]))
@click.option("--service", default=None, help="only events of this service (name)")
@click.option("--address", default=None, help="only events from or to this address")
@click.option("--timeout", type=float, default=None, help="stop after this many seconds")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@pass_context
def monitor(
    ctx: Context,
    types: tuple[str, ...],
    service: str | None,
    address: str | None,
    timeout: float | None,
    output: str,
) -> None:
    """Flow events as they happen (one line each; -o json: one JSON object a line)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with ctx.datapath() as dp:
        stream = dp.monitor(types or None, timeout, service=service, address=address)
        try:
            for event in stream:
                click.echo(event.to_json() if output == "json" else str(event))
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        finally:
            stream.close()  # type: ignore[attr-defined]
            stats = dp.event_stats()
            click.echo(
                f"# events sent {stats.sent}, lost {stats.lost}, rate-limited {stats.rate_limited}",
                err=True,
            )


# -- apply / delete ------


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path) as manifest:
            return manifest.read()
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None


def _translate(path: str) -> list[Any]:
    from pyebpflb import k8s

    try:
        return k8s.services(k8s.load(_read(path)))
    except k8s.ManifestError as exc:
        raise click.ClickException(f"{path}: {exc}; nothing was applied") from None


@main_group.command()
@click.option("-f", "--filename", "path", required=True, help="manifest file (- for stdin)")
@OUTPUT
@pass_context
def apply(ctx: Context, path: str, output: str) -> None:
    """Apply Kubernetes Services (+ Pods or EndpointSlices) from a manifest."""
    wanted = _translate(path)
    names = {s.name for s in wanted}
    keys = {s.key for s in wanted}
    with ctx.datapath(create=True) as dp:
        kept = [s for s in dp.services if s.name not in names and s.key not in keys]
        dp.sync(kept + wanted)
    if output == "json":
        emit(output, [_service_dict(s) for s in wanted], lambda: ([], []))
        return
    for svc in wanted:
        click.echo(f"service {svc.label}: {len(svc.backends)} backends")


@main_group.command()
@click.option("-f", "--filename", "path", required=True, help="manifest file (- for stdin)")
@OUTPUT
@pass_context
def delete(ctx: Context, path: str, output: str) -> None:
    """Remove the Services of a manifest."""
    wanted = _translate(path)
    names = {s.name for s in wanted}
    with ctx.datapath() as dp:
        before = dp.services
        kept = [s for s in before if s.name not in names]
        dp.sync(kept)
    gone = [s for s in before if s.name in names]
    if output == "json":
        emit(output, [_service_dict(s) for s in gone], lambda: ([], []))
        return
    for svc in gone:
        click.echo(f"service {svc.label} deleted")


# -- explain ------


@main_group.command()
@click.option("--src", required=True, help="IP[:PORT] (IPv6: [IP]:PORT)")
@click.option("--dst", required=True, help="IP:PORT")
@click.option("--proto", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True)
@click.option("--direction", type=click.Choice(["ingress", "egress"]), default="ingress")
@OUTPUT
@pass_context
def explain(ctx: Context, src: str, dst: str, proto: str, direction: str, output: str) -> None:
    """What the loaded programs do with a packet (a dry run: no state is touched)."""
    with ctx.datapath() as dp:
        answer = dp.explain(src, dst, proto, direction=direction)
    data = answer.to_dict()
    if output == "json":
        emit(output, data, lambda: ([], []))
        return
    click.echo(f"packet   {proto} {answer.source} -> {answer.destination} ({direction})")
    click.echo(
        f"verdict  {data['verdict']}" + (f" ({answer.drop_reason})" if answer.drop_reason else "")
    )
    click.echo(f"service  {data['service'] or '-'}")
    click.echo(f"backend  {data['backend'] or '-'}")
    if answer.policy_verdict is None:
        policy = "no policy for this direction"
    elif answer.policy_default:
        policy = f"{data['policy_verdict']} by the direction's default"
    else:
        policy = f"{data['policy_verdict']} by policy {answer.policy!r} rule {answer.rule}"
    click.echo(f"policy   {policy}")


# -- metrics ------


@main_group.command()
@click.option("--port", type=int, default=9090, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="address to listen on")
@pass_context
def metrics(ctx: Context, port: int, address: str) -> None:
    """Serve the datapath's counters as Prometheus metrics on /metrics."""
    from prometheus_client import CollectorRegistry, start_http_server

    from pyebpflb.metrics import DatapathCollector

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with ctx.datapath() as dp:
        registry = CollectorRegistry()
        registry.register(DatapathCollector(dp))
        server, thread = start_http_server(port, addr=address, registry=registry)
        click.echo(f"serving metrics of datapath {dp.name!r} on http://{address}:{port}/metrics")
        sys.stdout.flush()
        try:
            while thread.is_alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()


def main(argv: list[str] | None = None) -> int:
    try:
        main_group.main(args=argv, prog_name="pyebpflb", standalone_mode=False)
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except SystemExit as done:
        return int(done.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
