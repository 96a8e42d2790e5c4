"""kube-proxy's health checks, for the load balancers in front of the nodes.

One :class:`HealthServer` per datapath, as kube-proxy runs one per node:

- On each ``health_check_node_port`` of the datapath's services (Kubernetes'
  ``healthCheckNodePort`` of an ``externalTrafficPolicy: Local`` Service) an HTTP
  server answers any path with kube-proxy's JSON::

      {"service": {"namespace": "default", "name": "web"},
       "localEndpoints": 2, "serviceProxyHealthy": true}

  200 while the node has ready endpoints of the service, 503 when it has none,
  so a cloud load balancer sends the service's traffic only to nodes that can
  serve it without leaving the node. ``localEndpoints`` counts distinct ready
  endpoints (address and port) on this node over the service's ports, as
  kube-proxy's ``LocalReadyEndpoints``. Each answer also carries the header
  ``X-Load-Balancing-Endpoint-Weight``, as kube-proxy's.
- On ``port`` (10256, kube-proxy's ``--healthz-bind-address``), ``/healthz`` and
  ``/livez`` answer ``{"lastUpdated": ..., "currentTime": ..., "nodeEligible":
  true}``: 200 while the datapath is open and its state was last read within
  ``timeout`` seconds, 503 otherwise.

The servers listen in the datapath's network namespace. The health ports follow
the datapath's services: :meth:`HealthServer.refresh` reads them (the server's
own thread does every ``interval`` seconds, and a writer may call it after a
change).
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import socket
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import attrs

from pyebpflb._bpf.netns import entered
from pyebpflb.model import BackendState

if TYPE_CHECKING:
    from pyebpflb.datapath import Datapath

DEFAULT_PORT = 10256  # kube-proxy's healthz port


@attrs.frozen
class ServiceHealth:
    """What a health port says of its service."""

    namespace: str
    name: str
    local_endpoints: int

    def body(self) -> dict[str, Any]:
        return {
            "service": {"namespace": self.namespace, "name": self.name},
            "localEndpoints": self.local_endpoints,
            "serviceProxyHealthy": True,
        }


def _split_name(name: str) -> tuple[str, str]:
    """ "namespace/name" (pyebpflb.k8s names services so) -> its parts; a name without
    a namespace is in "default"."""
    namespace, _, rest = name.rpartition("/")
    return (namespace or "default", rest)


def service_health(datapath: Datapath) -> dict[int, ServiceHealth]:
    """Health port -> its service and how many ready endpoints it has on the datapath's
    node, for every service with a ``health_check_node_port``."""
    node = datapath.node.name if datapath.node is not None else None
    found: dict[int, tuple[str, set[tuple[Any, int]]]] = {}
    for entry in datapath.frontends:
        port = entry.health_check_node_port
        if port is None:
            continue
        _, endpoints = found.setdefault(port, (entry.name, set()))
        for backend in entry.backends:
            if backend.node == node and node is not None and backend.state is BackendState.ACTIVE:
                endpoints.add(backend.endpoint)
    return {
        port: ServiceHealth(*_split_name(name), len(endpoints))
        for port, (name, endpoints) in found.items()
    }


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: str, port: int, answer: Any) -> None:
        family = socket.AF_INET6 if ":" in address or not address else socket.AF_INET
        self.address_family = family
        self.answer = answer
        super().__init__((address or "::", port), _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # both families
        super().server_bind()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        status, body, headers = self.server.answer(self.path)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        return None


def _stop_server(server: _Server) -> None:
    server.shutdown()
    server.server_close()


def _now_text(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat().replace("+00:00", "Z")


class HealthServer:
    """kube-proxy's service and node health endpoints for ``datapath``.

    ``address``: where the servers listen ("" every address of the datapath's
    namespace, both families); ``port``: the node health port (None: none);
    ``interval``: how often the health ports follow the services; ``timeout``:
    how long /healthz stays healthy after the last successful read.
    """

    def __init__(
        self,
        datapath: Datapath,
        *,
        address: str = "",
        port: int | None = DEFAULT_PORT,
        interval: float = 1.0,
        timeout: float = 10.0,
    ) -> None:
        for what, value in (("interval", interval), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
        if port is not None and (isinstance(port, bool) or not 1 <= port <= 65535):
            raise ValueError(f"port must be from 1 to 65535 or None, got {port!r}")
        self._datapath = datapath
        self._address = address
        self._port = port
        self._interval = interval
        self._timeout = timeout
        self._health: dict[int, ServiceHealth] = {}
        self._servers: dict[int, _Server] = {}  # health port -> its server
        self._node_server: _Server | None = None
        self._updated = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- answers ---------------------------------------------------------------------------
    def _service_answer(self, port: int) -> Any:
        def answer(_path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
            with self._lock:
                health = self._health.get(port)
            if health is None:  # the service went; its server is about to close
                return 503, {"error": f"no service has health port {port}"}, {}
            count = health.local_endpoints
            weight = {"X-Load-Balancing-Endpoint-Weight": str(count)}
            return (200 if count else 503), health.body(), weight

        return answer

    def healthy(self) -> bool:
        """The datapath is open and was read within ``timeout`` seconds."""
        with self._lock:
            updated = self._updated
        return not self._datapath.closed and time.time() - updated <= self._timeout

    def _node_answer(self, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        route = path.split("?", 1)[0]
        if route not in ("/healthz", "/livez"):
            return 404, {"error": f"{route} is not served: /healthz and /livez are"}, {}
        with self._lock:
            updated = self._updated
        now = time.time()
        body = {
            "lastUpdated": _now_text(updated) if updated else "",
            "currentTime": _now_text(now),
            "nodeEligible": True,
        }
        return (200 if self.healthy() else 503), body, {}

    # -- following the services ------------------------------------------------------------
    def refresh(self) -> dict[int, ServiceHealth]:
        """Read the datapath's services; open the health ports new services have and close
        those of services gone. Returns health port -> what it answers now."""
        health = service_health(self._datapath)
        with self._lock:
            self._health = health
            self._updated = time.time()
        for port in list(self._servers):
            if port not in health:
                self._close_server(port)
        for port in health:
            if port not in self._servers:
                self._servers[port] = self._open(port, self._service_answer(port))
        return dict(health)

    def _open(self, port: int, answer: Any) -> _Server:
        netns = self._datapath.netns
        with entered(netns) if netns else contextlib.nullcontext():
            server = _Server(self._address, port, answer)
        threading.Thread(target=server.serve_forever, name=f"health-{port}", daemon=True).start()
        return server

    def _close_server(self, port: int) -> None:
        _stop_server(self._servers.pop(port))

    @property
    def ports(self) -> list[int]:
        """The services' health ports listened on."""
        return sorted(self._servers)

    def start(self) -> Self:
        """Listen (the node health port and every service's), and follow the services."""
        if self._thread is not None:
            return self
        self.refresh()
        if self._port is not None:
            self._node_server = self._open(self._port, self._node_answer)
        self._thread = threading.Thread(target=self._follow, name="health-refresh", daemon=True)
        self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # unhealthy until a read works again
                if self._datapath.closed:
                    return
                self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for port in list(self._servers):
            self._close_server(port)
        if self._node_server is not None:
            _stop_server(self._node_server)
            self._node_server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["DEFAULT_PORT", "HealthServer", "ServiceHealth", "service_health"]
