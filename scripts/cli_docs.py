"""Write docs/cli/*.md: one page per `pyebpflb` command, with its help and the
output of a real run against a datapath in a sandbox.

Run as root from the repository: `.venv/bin/python scripts/cli_docs.py`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
import tempfile

import pyebpflb as lb
from pyebpflb.testing.sandbox import BACKEND_PORT, Sandbox

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli"
NAME = "docs"

MANIFEST = """\
apiVersion: v1
kind: Service
metadata:
  name: my-app-service
  namespace: default
spec:
  clusterIP: 10.96.0.10
  selector:
    app: my-app
  ports:
  - name: web
    protocol: TCP
    port: 80
    targetPort: http
""" + "".join(
    f"""---
apiVersion: v1
kind: Pod
metadata:
  name: my-app-{i}
  namespace: default
  labels:
    app: my-app
spec:
  containers:
  - name: app
    image: my-app:1
    ports:
    - name: http
      containerPort: {BACKEND_PORT}
status:
  podIP: 10.91.{i}.2
  conditions:
  - type: Ready
    status: "True"
"""
    for i in (1, 2, 3)
)

PAGES = {
    "status": "Programs attached, map fill levels, kernel and libbpf versions, features.",
    "service": "`service list` and `service get NAME`: what the datapath balances, with counters.",
    "backend": "`backend list`: every backend of every service, with its counters.",
    "ct": "`ct list`, `ct stats`, `ct gc` and `ct flush`: the connection tracking tables.",
    "bpf-map": "`bpf map list`: the datapath's maps, their fill levels and pins.",
    "monitor": "`monitor`: flow events as they happen (trace, drop, policy).",
    "apply": "`apply -f` and `delete -f`: Kubernetes manifests in, services out.",
    "explain": "`explain`: what the programs would do with a packet, without touching state.",
    "metrics": "`metrics`: the counters as Prometheus metrics over HTTP.",
    "agent": (
        "`agent`: follow a cluster's Services and EndpointSlices into the datapath, as "
        "kube-proxy (what deploy/daemonset.yaml runs; docs/kubernetes.md)."
    ),
    "datapath": (
        "`datapath list`, `datapath prune`, `attach`, `detach`, `destroy`: a datapath's life "
        "(`$PYEBPFLB_DATAPATH` and `$PYEBPFLB_NETNS` give `--datapath` and `--netns`)."
    ),
}


def command(sandbox: Sandbox, *args: str) -> list[str]:
    """`pyebpflb --datapath docs --netns <the sandbox's> ARGS` with this interpreter."""
    return [
        sys.executable,
        "-m",
        "pyebpflb",
        "--datapath",
        NAME,
        "--netns",
        sandbox.lb.netns,
        *args,
    ]


def run(sandbox: Sandbox, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        command(sandbox, *args), capture_output=True, text=True, input=stdin, timeout=60
    )
    shown = " ".join(["pyebpflb", "--datapath", NAME, "--netns", "demo-lb", *args])
    return f"$ {shown}\n{done.stdout}{done.stderr}".rstrip() + "\n"


def page(name: str, blocks: list[tuple[str, str]]) -> None:
    lines = [f"# pyebpflb {name.replace('-', ' ')}", "", PAGES[name], ""]
    lines += [
        "Captured from a run of `scripts/cli_docs.py` (a sandbox of network namespaces: a "
        "client 10.90.0.2, the load balancer's namespace, shown as `demo-lb`, pods "
        "10.91.N.2 serving HTTP on 8080).",
        "",
    ]
    for title, text in blocks:
        lines += [f"## {title}", "", "```", text.rstrip(), "```", ""]
    (OUT / f"{name}.md").write_text("\n".join(lines))


def agent_blocks(sandbox: Sandbox, folder: str) -> list[tuple[str, str]]:
    """`pyebpflb agent` against the stand-in API server (pyebpflb.testing.apiserver)
    holding my-app-service and its EndpointSlice, stopped by SIGTERM."""
    import signal
    import time

    from pyebpflb.testing.apiserver import ApiServer

    service = {
        "kind": "Service",
        "metadata": {"name": "my-app-service", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "web", "port": 80,
                                                        "targetPort": "http"}]},
    }  # fmt: skip
    endpoints = {
        "kind": "EndpointSlice",
        "metadata": {"name": "my-app-service-abcde", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "my-app-service"}},
        "addressType": "IPv4",
        "ports": [{"name": "web", "port": BACKEND_PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [f"10.91.{i}.2"], "conditions": {"ready": True},
                       "nodeName": "demo-node"} for i in (1, 2, 3)],
    }  # fmt: skip
    # In this namespace: `--netns` makes the agent's datapath there, its requests here.
    with ApiServer() as api:
        node = {
            "kind": "Node",
            "metadata": {"name": "demo-node", "labels": {"topology.kubernetes.io/zone": "a"}},
            "status": {"addresses": [{"type": "InternalIP", "address": str(sandbox.lb.ipv4)}]},
        }
        api.apply(node, service, endpoints)
        kubeconfig = api.kubeconfig(os.path.join(folder, "kubeconfig"))
        args = ["agent", "--kubeconfig", "kubeconfig", "--node-name", "demo-node",
                "--interfaces", sandbox.lb.iface, "--metrics-address", "",
                "--health-port", "0"]  # fmt: skip
        started = subprocess.Popen(
            [*command(sandbox, *args)[: -len(args)], *args[:2], kubeconfig, *args[3:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                sandbox.http_get("10.96.0.10", 80)
                break
            time.sleep(0.1)
        listed = run(sandbox, "service", "list")
        started.send_signal(signal.SIGTERM)
        out, _ = started.communicate(timeout=30)
    shown = " ".join(["pyebpflb", "--datapath", NAME, "--netns", "demo-lb", *args])
    return [
        ("Follow the API server (stopped with SIGTERM)", f"$ {shown}\n{out}"),
        ("What it programmed", listed),
        ("Help", run(sandbox, "agent", "--help")),
    ]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with (
        Sandbox(backends=3, prefix="pyebpflb-docs") as sandbox,
        lb.Datapath(NAME, netns=sandbox.lb.netns) as dp,
    ):
        dp.attach(sandbox.lb.iface)
        with tempfile.TemporaryDirectory() as folder:
            manifest = os.path.join(folder, "my-app.yaml")
            pathlib.Path(manifest).write_text(MANIFEST)
            bad = os.path.join(folder, "broken.yaml")
            pathlib.Path(bad).write_text(
                MANIFEST.replace("clusterIP: 10.96.0.10", "clusterIP: 10.96.0.300")
            )
            applied = run(sandbox, "apply", "-f", manifest)
            broken = run(sandbox, "apply", "-f", bad)
            page(
                "apply",
                [
                    ("The manifest", MANIFEST),
                    ("Apply", applied),
                    ("A manifest with an error changes nothing", broken),
                    ("Help", run(sandbox, "apply", "--help")),
                ],
            )
            dp.upsert(lb.Service("10.96.0.20", 80, name="default/no-pods-yet"))
            dp.upsert_policy(
                lb.Policy("no-ssh", [lb.Rule("deny", None, "tcp", 22)], direction="ingress")
            )
            watcher = subprocess.Popen(
                command(sandbox, "monitor", "--timeout", "4"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert watcher.stdout is not None
            ready = watcher.stdout.readline()  # "# reading the flow events ...": it reads
            for _ in range(3):
                sandbox.http_get("10.96.0.10", 80)
            with contextlib.suppress(ConnectionRefusedError):
                sandbox.http_get("10.96.0.20", 80)
            with contextlib.suppress(OSError):
                sandbox.http_get("10.91.1.2", 22, timeout=0.3)
            watched, _ = watcher.communicate(timeout=30)
            page(
                "monitor",
                [
                    (
                        "Three requests, a service without pods, a denied port",
                        "$ pyebpflb --datapath docs --netns demo-lb monitor --timeout 4\n"
                        + ready
                        + watched,
                    ),
                    ("Help", run(sandbox, "monitor", "--help")),
                ],
            )
            with sandbox.connection("10.96.0.10", 80) as conn:
                conn.get()
                ct = run(sandbox, "ct", "list")
                ct_json = run(sandbox, "ct", "list", "-o", "json")
                ct_stats = run(sandbox, "ct", "stats")
            page(
                "ct",
                [
                    ("An open connection", ct),
                    ("As JSON", ct_json),
                    ("The tables", ct_stats),
                    ("Collect the dead entries now", run(sandbox, "ct", "gc")),
                    ("Flush", run(sandbox, "ct", "flush")),
                ],
            )
            page(
                "status",
                [
                    ("Status", run(sandbox, "status")),
                    ("As JSON", run(sandbox, "status", "-o", "json")),
                ],
            )
            page(
                "service",
                [
                    ("List", run(sandbox, "service", "list")),
                    ("Get", run(sandbox, "service", "get", "default/my-app-service")),
                    ("As JSON", run(sandbox, "service", "list", "-o", "json")),
                ],
            )
            page(
                "backend",
                [
                    ("List", run(sandbox, "backend", "list")),
                    ("As JSON", run(sandbox, "backend", "list", "-o", "json")),
                ],
            )
            page(
                "bpf-map",
                [
                    ("List", run(sandbox, "bpf", "map", "list")),
                    (
                        "As JSON (first entries)",
                        run(sandbox, "bpf", "map", "list", "-o", "json")[:1200] + "\n...",
                    ),
                ],
            )
            page(
                "explain",
                [
                    (
                        "A new connection to the service",
                        run(sandbox, "explain", "--src", "10.90.0.2", "--dst", "10.96.0.10:80"),
                    ),
                    (
                        "A denied port",
                        run(sandbox, "explain", "--src", "10.90.0.2", "--dst", "10.91.1.2:22"),
                    ),
                    (
                        "A service without pods, as JSON",
                        run(
                            sandbox,
                            "explain",
                            "--src",
                            "10.90.0.2",
                            "--dst",
                            "10.96.0.20:80",
                            "-o",
                            "json",
                        ),
                    ),
                ],
            )
            server = subprocess.Popen(
                command(sandbox, "metrics", "--port", "19090"),
                stdout=subprocess.PIPE,
                text=True,
            )
            assert server.stdout is not None
            started = server.stdout.readline()
            scraped = subprocess.run(
                [
                    "python3",
                    "-c",
                    "import urllib.request as u; print(u.urlopen('http://127.0.0.1:19090/metrics').read().decode())",
                ],
                capture_output=True,
                text=True,
            ).stdout
            server.terminate()
            server.wait()
            wanted = [
                line
                for line in scraped.splitlines()
                if line.startswith("pyebpflb_") or line.startswith("# HELP pyebpflb_")
            ]
            page(
                "metrics",
                [
                    (
                        "Serve",
                        "$ pyebpflb --datapath docs --netns demo-lb metrics --port 19090\n"
                        + started,
                    ),
                    ("Scraped (curl http://127.0.0.1:19090/metrics)", "\n".join(wanted)),
                ],
            )
            life = [
                ("Every datapath on the host", run(sandbox, "datapath", "list")),
                ("Detach", run(sandbox, "detach", sandbox.lb.iface)),
                ("Attached nowhere: its pins hold it", run(sandbox, "datapath", "list")),
                ("Attach again (idempotent)", run(sandbox, "attach", sandbox.lb.iface)),
                ("As JSON", run(sandbox, "datapath", "list", "-o", "json")),
                ("Help", run(sandbox, "datapath", "--help")),
            ]
            page("datapath", life)
            run(sandbox, "delete", "-f", manifest)
            page("agent", agent_blocks(sandbox, folder))
    print(f"wrote {len(PAGES)} pages to {OUT}")


if __name__ == "__main__":
    main()
