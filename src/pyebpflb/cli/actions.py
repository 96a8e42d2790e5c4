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


class _Manifest:
    """What a manifest holds, translated: services and NetworkPolicies' policies."""

    def __init__(self, done: Any, policies: Any, origins: list[str]) -> None:
        self.done, self.policies, self.origins = done, policies, origins

    def owned(self, name: str) -> bool:
        from pyebpflb.k8s.netpol import owned_by

        return any(owned_by(name, origin) for origin in self.origins)


def _translate(path: str) -> _Manifest:
    from pyebpflb import k8s
    from pyebpflb.k8s.translate import _namespace

    try:
        objects = k8s.load(_read(path))
    except k8s.ManifestError as exc:
        raise click.ClickException(f"{path}: {exc}; nothing was applied") from None
    done = k8s.translate(objects)
    network = [o for o in objects if isinstance(o, dict) and o.get("kind") == "NetworkPolicy"]
    policies = k8s.network_policies(objects) if network else None
    problems = done.problems + (policies.problems if policies is not None else [])
    if problems:
        listed = "".join(f"\n  {problem}" for problem in problems)
        raise click.ClickException(f"{path}: nothing was applied:{listed}")
    if not any(o.get("kind") == "Service" for o in objects) and not network:
        raise click.ClickException(
            f"{path}: the manifest has no Service and no NetworkPolicy; nothing was applied"
        )
    for reason in done.skipped + (policies.skipped if policies is not None else []):
        click.echo(f"skipped {reason}", err=True)
    origins = [f"{_namespace(o)}/{(o.get('metadata') or {}).get('name', '')}" for o in network]
    return _Manifest(done, policies, origins)


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
    """Apply Kubernetes Services (+ Pods or EndpointSlices) and NetworkPolicies (+ the
    Pods and Namespaces they select) from a manifest."""
    manifest = _translate(path)
    done = manifest.done
    wanted = done.services
    names = {s.name for s in wanted}
    keys = {s.key for s in wanted}
    new_policies = manifest.policies.policies if manifest.policies is not None else []
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
            # A NetworkPolicy's policies are replaced whole: those it no longer makes go.
            policies = [p for p in dp.policies if not manifest.owned(p.name)] + new_policies
            dp.sync(kept + wanted, policies)
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
    from pyebpflb.k8s.netpol import owned_by

    for origin in manifest.origins:
        made = [p for p in new_policies if owned_by(p.name, origin)]
        subjects = len({s for p in made for s in p.subjects})
        click.echo(f"networkpolicy {origin}: {len(made)} policies for {subjects} endpoints")


@main_group.command()
@click.option("-f", "--filename", "path", required=True, help="manifest file (- for stdin)")
@OUTPUT
@pass_context
def delete(ctx: Context, path: str, output: str) -> None:
    """Remove the Services and NetworkPolicies of a manifest."""
    manifest = _translate(path)
    names = {s.name for s in manifest.done.services}
    with ctx.datapath(writes=True) as dp, dp.write_lock():
        before = dp.services
        kept = [s for s in before if s.name not in names]
        policies = [p for p in dp.policies if not manifest.owned(p.name)]
        dp.sync(kept, policies)
    gone = [s for s in before if s.name in names]
    if output == "json":
        emit(output, [service_dict(s) for s in gone], lambda: ([], []))
        return
    for svc in gone:
        click.echo(f"service {svc.label} deleted")
    for origin in manifest.origins:
        click.echo(f"networkpolicy {origin} deleted")


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
        if answer.origin is not None:
            policy += f" ({answer.origin})"
    click.echo(f"policy   {policy}")
    if answer.selected_by:  # policies for some endpoints (a NetworkPolicy's pods)
        names = ", ".join(repr(n) for n in answer.selected_by)
        click.echo(f"endpoint {answer.endpoint}: subject {answer.subject} of {names}")


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
