"""Commands that drive a datapath: demo, monitor, apply and delete manifests, explain,
metrics."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import click

from pyebpflb.cli.base import OUTPUT, Context, emit, main_group, pass_context, service_dict


@main_group.command()
def demo() -> None:
    """Build a sandbox and balance a service through it (what `make demo` runs)."""
    from pyebpflb.testing import demo as story

    sys.exit(story.run())


# -- status ------


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
    """Flow events as they happen (one line each; -o json: one JSON object a line).
    One monitor per datapath at a time; the closing line counts what this one saw."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with ctx.datapath() as dp:
        before = dp.event_stats()
        reader = dp.open_monitor(types or None, service=service, address=address)
        shown = 0
        click.echo(f"# reading the flow events of datapath {dp.name}", err=True)
        try:
            for event in reader.events(timeout):
                click.echo(event.to_json() if output == "json" else str(event))
                sys.stdout.flush()
                shown += 1
        except KeyboardInterrupt:
            pass
        finally:
            reader.close()
            after = dp.event_stats()
            click.echo(
                f"# this monitor read {reader.received} events, showed {shown}"
                + (
                    f", dropped {reader.overflowed} (its queue was full)"
                    if reader.overflowed
                    else ""
                )
                + f"; meanwhile the datapath lost {after.lost - before.lost} (ring full) and "
                f"held back {after.rate_limited - before.rate_limited} (rate limit)",
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


def _translate(path: str) -> Any:
    from pyebpflb import k8s

    try:
        objects = k8s.load(_read(path))
    except k8s.ManifestError as exc:
        raise click.ClickException(f"{path}: {exc}; nothing was applied") from None
    done = k8s.translate(objects)
    if done.problems:
        listed = "".join(f"\n  {problem}" for problem in done.problems)
        raise click.ClickException(f"{path}: nothing was applied:{listed}")
    if not any(o.get("kind") == "Service" for o in objects):
        raise click.ClickException(f"{path}: the manifest has no Service; nothing was applied")
    for reason in done.skipped:
        click.echo(f"skipped {reason}", err=True)
    return done


@main_group.command()
@click.option("-f", "--filename", "path", required=True, help="manifest file (- for stdin)")
@click.option(
    "--replace-endpoints",
    is_flag=True,
    help="a Service whose endpoints the manifest does not hold gets none (default: it keeps "
    "the backends it has, as `kubectl apply` of Services leaves their EndpointSlices alone)",
)
@OUTPUT
@pass_context
def apply(ctx: Context, path: str, replace_endpoints: bool, output: str) -> None:
    """Apply Kubernetes Services (+ Pods or EndpointSlices) from a manifest."""
    done = _translate(path)
    wanted = done.services
    names = {s.name for s in wanted}
    keys = {s.key for s in wanted}
    with ctx.datapath(create=True) as dp:
        with dp.write_lock():  # no other writer between the read and the sync
            installed = dp.services
            if not replace_endpoints:
                # Endpoints come from elsewhere (`kubectl get svc -A -o yaml` holds no
                # Pods or EndpointSlices): what the datapath has stays.
                held = {s.key: s for s in installed}
                elsewhere = set(done.without_endpoints)
                wanted = [
                    s.with_backends(held[s.key].backends)
                    if s.name in elsewhere and s.key in held
                    else s
                    for s in wanted
                ]
            kept = [s for s in installed if s.name not in names and s.key not in keys]
            dp.sync(kept + wanted)
        if not dp.interfaces:
            click.echo(
                f"note: datapath {dp.name} is attached to no interface: the services are "
                "stored but serve no traffic (pyebpflb attach IFACE)",
                err=True,
            )
    if output == "json":
        emit(output, [service_dict(s) for s in wanted], lambda: ([], []))
        return
    for svc in wanted:
        click.echo(f"service {svc.label}: {len(svc.backends)} backends")


@main_group.command()
@click.option("-f", "--filename", "path", required=True, help="manifest file (- for stdin)")
@OUTPUT
@pass_context
def delete(ctx: Context, path: str, output: str) -> None:
    """Remove the Services of a manifest."""
    wanted = _translate(path).services
    names = {s.name for s in wanted}
    with ctx.datapath(writes=True) as dp, dp.write_lock():
        before = dp.services
        kept = [s for s in before if s.name not in names]
        dp.sync(kept)
    gone = [s for s in before if s.name in names]
    if output == "json":
        emit(output, [service_dict(s) for s in gone], lambda: ([], []))
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
