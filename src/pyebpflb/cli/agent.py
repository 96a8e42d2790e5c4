"""``pyebpflb agent``: what a DaemonSet runs on every node, in place of kube-proxy."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
from typing import Any

import click

from pyebpflb.cli.base import Context, main_group, pass_context

log = logging.getLogger("pyebpflb.agent")


def _host_port(text: str, what: str) -> tuple[str, int] | None:
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{text!r}: give host:port, e.g. 127.0.0.1:10249", param_hint=what)
    return host.strip("[]"), int(port)


def _node(api: Any, name: str, zone: str | None, stop: threading.Event) -> Any:
    """This node as the API server describes it: its InternalIPs (one per family, the
    first, kube-proxy's primary node IPs) and its zone label. Asked again (back-off up
    to 30 s) while the API server cannot be reached; a Node the server does not have
    or will not show is a warning, as in kube-proxy: no node addresses then."""
    import ipaddress
    import json

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from pyebpflb.k8s import ZONE_LABEL
    from pyebpflb.model import Node

    delay = 0.5
    while True:
        try:
            response: Any = client.CoreV1Api(api).read_node(
                name, _preload_content=False, _request_timeout=30
            )
            obj = json.loads(response.data)  # the object as the API server sent it
            break
        except ApiException as exc:
            if exc.status in (401, 403, 404):
                log.warning(
                    "Node %s: %s %s: NodePorts answer nowhere", name, exc.status, exc.reason
                )
                return Node(name, zone=zone or "")
            problem: Exception = exc
        except Exception as exc:  # the network: ask again
            problem = exc
        log.warning("reading Node %s: %s; again in %.1f s", name, problem, delay)
        if stop.wait(delay):
            raise click.ClickException("stopped before the API server answered")
        delay = min(delay * 2, 30.0)
    addresses: list[Any] = []
    for entry in (obj.get("status") or {}).get("addresses") or []:
        if entry.get("type") != "InternalIP":
            continue
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(str(entry.get("address")))
            if all(a.version != ip.version for a in addresses):
                addresses.append(ip)
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return Node(name, addresses=tuple(addresses), zone=zone or str(labels.get(ZONE_LABEL, "")))


@main_group.command()
@click.option("--kubeconfig", default=None, help="kubeconfig file [in a pod: its service account]")
@click.option("--context", "kube_context", default=None, help="kubeconfig context")
@click.option(
    "--api-server",
    default=None,
    envvar="PYEBPFLB_API_SERVER",
    show_envvar=True,
    help="API server URL (https://host:port): not through the kubernetes Service",
)
@click.option(
    "--node-name",
    default=None,
    envvar="NODE_NAME",
    show_envvar=True,
    help="this node's name [the host name]",
)
@click.option("--zone", default=None, help="this node's zone [its topology.kubernetes.io/zone]")
@click.option("--interfaces", default="", help="interfaces to attach to, comma-separated")
@click.option(
    "--cgroup",
    default="/",
    show_default=True,
    help='cgroup whose sockets are balanced at connect() ("" for none)',
)
@click.option(
    "--metrics-address",
    default="127.0.0.1:10249",
    show_default=True,
    help='Prometheus /metrics host:port ("" for none; kube-proxy\'s metricsBindAddress)',
)
@click.option(
    "--health-port",
    type=click.IntRange(0, 65535),
    default=10256,
    show_default=True,
    help="node health port, /healthz and /livez (0 for none; kube-proxy's healthz port)",
)
@click.option("--min-sync-period", type=click.FloatRange(0), default=1.0, show_default=True)
@click.option(
    "--network-policy",
    is_flag=True,
    help="enforce NetworkPolicies too (watches Pods, Namespaces and NetworkPolicies)",
)
@click.option(
    "--watch-timeout",
    type=click.IntRange(1),
    default=300,
    show_default=True,
    help="seconds one watch lasts before it is made again",
)
@pass_context
def agent(
    ctx: Context,
    kubeconfig: str | None,
    kube_context: str | None,
    api_server: str | None,
    node_name: str | None,
    zone: str | None,
    interfaces: str,
    cgroup: str,
    metrics_address: str,
    health_port: int,
    min_sync_period: float,
    network_policy: bool,
    watch_timeout: int,
) -> None:
    """Follow the cluster's Services and EndpointSlices into the datapath, as kube-proxy
    (and its NetworkPolicies, with --network-policy, as Cilium).

    Attaches to INTERFACES and CGROUP, serves metrics and health, and stops on
    SIGTERM or SIGINT keeping the datapath (pinned, attached): connections go on, and
    the next agent takes over what this one programmed."""
    from pyebpflb.datapath import DEFAULT_PIN_ROOT, Datapath
    from pyebpflb.errors import PyEbpfLbError
    from pyebpflb.health import HealthServer
    from pyebpflb.k8s import ServiceProxy, Watcher
    from pyebpflb.k8s.watch import api_client

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # the watch loop says it once
    metrics_at = _host_port(metrics_address, "--metrics-address")
    ifaces = [i.strip() for i in interfaces.split(",") if i.strip()]
    try:
        api = api_client(kubeconfig, context=kube_context, api_server=api_server)
    except (RuntimeError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # the kubernetes client's ConfigException
        raise click.ClickException(f"no API server to follow: {exc}") from None
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    node = _node(api, node_name or socket.gethostname(), zone, stop)
    try:
        dp = Datapath(
            ctx.name,
            persist=True,
            netns=ctx.netns,
            pin_root=ctx.pin_root or DEFAULT_PIN_ROOT,
            node=node,
        )
    except (PyEbpfLbError, PermissionError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    health = metrics_server = None
    try:
        for iface in ifaces:
            dp.attach(iface)
        if cgroup:
            dp.attach_cgroup(cgroup)
        if health_port:
            health = HealthServer(dp, port=health_port).start()
        proxy = ServiceProxy(
            dp, node=node, min_sync_period=min_sync_period, network_policy=network_policy
        )
        watcher = Watcher(proxy, api, timeout_seconds=watch_timeout)
        if metrics_at is not None:
            from prometheus_client import CollectorRegistry, start_http_server

            from pyebpflb.metrics import DatapathCollector, WatcherCollector

            registry = CollectorRegistry()
            registry.register(DatapathCollector(dp))
            registry.register(WatcherCollector(watcher))
            metrics_server, _ = start_http_server(
                metrics_at[1], addr=metrics_at[0], registry=registry
            )
        where = ", ".join(ifaces) or "no interface"
        click.echo(
            f"agent: datapath {dp.name} on {where}"
            + (f", cgroup {cgroup}" if cgroup else "")
            + f"; node {node.name}"
            + (f" in zone {node.zone}" if node.zone else "")
            + f"; following {api.configuration.host}"
            + (" with NetworkPolicies" if network_policy else "")
        )
        sys.stdout.flush()
        watcher.run(stop)
    except (PyEbpfLbError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if health is not None:
            health.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        api.close()
        dp.close()  # persist: pinned and attached, the next agent takes over
    click.echo(f"agent: stopped; datapath {dp.name} kept (pinned, attached)")
