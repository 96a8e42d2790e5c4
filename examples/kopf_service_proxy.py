"""pyebpflb's service proxy inside a kopf operator: kopf watches, pyebpflb programs.

For people whose controller already runs on kopf (https://kopf.readthedocs.io): the
operator gets Services and EndpointSlices from kopf's watches and hands them to a
:class:`pyebpflb.k8s.ServiceProxy`, which programs this node's datapath. Run it on a
node, as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON):

    NODE_NAME=$(hostname) IFACE=eth0 kopf run --all-namespaces examples/kopf_service_proxy.py

kopf says nothing when its first list of a resource is complete, and the proxy must
not program a Service before both lists arrived (or it would briefly have no
endpoints): so the startup handler lists both once itself (``replace_all``), and
kopf's events update from there. A timer thread syncs, at most once per
``min_sync_period``, as kube-proxy.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import kopf

import pyebpflb as lb
from pyebpflb import k8s

state: dict[str, Any] = {}
lock = threading.Lock()  # kopf runs synchronous handlers in a thread pool


@kopf.on.startup()
def start(**_: Any) -> None:
    import json

    from kubernetes import client

    from pyebpflb.k8s.watch import LABEL_SELECTOR, api_client

    node = lb.Node(os.environ.get("NODE_NAME") or socket.gethostname())
    datapath = lb.Datapath(
        os.environ.get("PYEBPFLB_DATAPATH", "kopf"),
        persist=True,
        node=node,
        pin_root=os.environ.get("PYEBPFLB_PIN_ROOT", "/sys/fs/bpf/pyebpflb"),
    )
    if os.environ.get("IFACE"):
        datapath.attach(os.environ["IFACE"])
    proxy = k8s.ServiceProxy(datapath)
    api = api_client(os.environ.get("KUBECONFIG"))
    listed = [
        json.loads(method(label_selector=LABEL_SELECTOR, _preload_content=False).data).get(
            "items", []
        )
        for method in (
            client.CoreV1Api(api).list_service_for_all_namespaces,
            client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
        )
    ]
    proxy.replace_all(*listed)
    stop = threading.Event()
    threading.Thread(target=syncing, args=(proxy, stop), daemon=True).start()
    state.update(datapath=datapath, proxy=proxy, stop=stop)


def syncing(proxy: k8s.ServiceProxy, stop: threading.Event) -> None:
    while not stop.wait(max(proxy.min_sync_period, 0.1)):
        with lock:
            if proxy.pending:
                proxy.sync()


def kind_of(event: dict[str, Any]) -> str:
    # kopf's first delivery of an object (its own listing) has no type: an ADDED.
    return str(event.get("type") or "ADDED")


@kopf.on.event("v1", "services")
def service_event(event: dict[str, Any], **_: Any) -> None:
    with lock:
        state["proxy"].on_service(kind_of(event), event["object"])


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices")
def endpointslice_event(event: dict[str, Any], **_: Any) -> None:
    with lock:
        state["proxy"].on_endpointslice(kind_of(event), event["object"])


@kopf.on.cleanup()
def stop(**_: Any) -> None:
    state["stop"].set()
    state["datapath"].close()  # persist: pinned and attached, connections go on
