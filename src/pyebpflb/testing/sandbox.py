"""A whole service network on one machine, in network namespaces.

``Sandbox(backends=3)`` builds a client, a load balancer (a router with
forwarding on) and N backends, each in its own network namespace, joined by
veth pairs with IPv4 and IPv6 addresses; every backend runs a small HTTP and
UDP server on port 8080 that answers with its name. Leaving the ``with``
block stops the servers and removes the namespaces, also after an error.
Tests, the demo, benchmarks and notebooks use it. Needs root and iproute2.

::

    client 10.90.0.2      lb0 10.90.0.1 [load balancer] be1 10.91.1.1 -- 10.91.1.2 backend-1
           fd00:90::2         fd00:90::1                 be2 10.91.2.1 -- 10.91.2.2 backend-2 ...

The client's default route points at the load balancer, so a VIP from any
range not otherwise routed (10.96.0.0/12, fd00:96::/64, ...) reaches
``lb0`` ingress, where the datapath is attached.

``Sandbox(router_mtu=1280)`` puts a router between the client and the load
balancer, whose link towards the client has that MTU (the client's side keeps
1500, so it announces the usual MSS): what the backends send through the VIP
must then find the path MTU through the load balancer::

    client 10.89.0.2 -- rt0 10.89.0.1 [router] eth0 10.90.0.2 -- lb0 10.90.0.1 ...
           fd00:89::2       fd00:89::1             fd00:90::2       fd00:90::1
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Any, Self

import attrs

from pyebpflb._bpf.netns import entered
from pyebpflb.model import Address

BACKEND_PORT = 8080
LB_IFACE = "lb0"
_PR_SET_PDEATHSIG = 1


@attrs.frozen
class Host:
    """A namespace of the sandbox and its addresses on its link towards the load balancer."""

    name: str
    netns: str
    iface: str
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address

    def address(self, family: int) -> Address:
        return self.ipv4 if family == 4 else self.ipv6

    def socket(self, family: int = 4, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket created inside this host's namespace (it stays there)."""
        with entered(self.netns):
            return socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, kind)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


def _sysctl(netns: str, key: str, value: str) -> None:
    with entered(netns), open(f"/proc/sys/{key.replace('.', '/')}", "w") as knob:
        knob.write(value)


def _die_with_parent() -> None:
    # The servers must not outlive a test process that is killed.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Namespaces:
    """Network namespaces a test world is built of, and the servers in them: made
    on entering the ``with`` block (undone if the building fails), stopped and
    removed on leaving it. Subclasses build in :meth:`_build`."""

    def __init__(self) -> None:
        self._namespaces: list[str] = []
        self._servers: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        raise NotImplementedError

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        # No duplicate address detection: link-local addresses would stay
        # tentative for a second, and neighbour discovery with them.
        for scope in ("all", "default"):
            _sysctl(name, f"net.ipv6.conf.{scope}.accept_dad", "0")

    def close(self) -> None:
        stop(self._servers)
        for name in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._namespaces.clear()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Sandbox(Namespaces):
    """Client, load balancer and ``backends`` backends in network namespaces."""

    def __init__(
        self,
        backends: int = 3,
        *,
        prefix: str = "pyebpflb",
        names: Sequence[str] | None = None,
        router_mtu: int | None = None,
    ) -> None:
        if isinstance(backends, bool) or not isinstance(backends, int) or not 1 <= backends <= 200:
            raise ValueError(f"backends must be an integer from 1 to 200, got {backends!r}")
        if router_mtu is not None and (
            isinstance(router_mtu, bool)
            or not isinstance(router_mtu, int)
            or not 1280 <= router_mtu <= 1500
        ):
            raise ValueError(
                f"router_mtu must be None or an integer from 1280 to 1500, got {router_mtu!r}"
            )
        self.router_mtu = router_mtu
        if names is not None and len(names) != backends:
            raise ValueError(f"names must give one name per backend ({backends}), got {names!r}")
        labels = (
            list(names) if names is not None else [f"backend-{i}" for i in range(1, backends + 1)]
        )
        tag = f"{prefix}-{os.getpid()}"
        behind = router_mtu is not None
        self.client = Host(
            "client",
            f"{tag}-client",
            "eth0",
            ipaddress.IPv4Address("10.89.0.2" if behind else "10.90.0.2"),
            ipaddress.IPv6Address("fd00:89::2" if behind else "fd00:90::2"),
        )
        self.router = (
            Host(
                "router",
                f"{tag}-rt",
                "eth0",
                ipaddress.IPv4Address("10.90.0.2"),
                ipaddress.IPv6Address("fd00:90::2"),
            )
            if behind
            else None
        )
        self.lb = Host(
            "lb",
            f"{tag}-lb",
            LB_IFACE,
            ipaddress.IPv4Address("10.90.0.1"),
            ipaddress.IPv6Address("fd00:90::1"),
        )
        self.backends = [
            Host(
                labels[i - 1],
                f"{tag}-be{i}",
                "eth0",
                ipaddress.IPv4Address(f"10.91.{i}.2"),
                ipaddress.IPv6Address(f"fd00:91:{i}::2"),
            )
            for i in range(1, backends + 1)
        ]
        super().__init__()

    @property
    def namespaces(self) -> list[str]:
        router = [self.router.netns] if self.router else []
        return [self.client.netns, *router, self.lb.netns, *(b.netns for b in self.backends)]

    # -- building -------------------------------------------------------------------
    def _link(self, a: Host, a_iface: str, b: Host, b_iface: str) -> None:
        _ip(
            "-n",
            a.netns,
            "link",
            "add",
            a_iface,
            "type",
            "veth",
            "peer",
            "name",
            b_iface,
            "netns",
            b.netns,
        )

    def _address(self, host: Host, iface: str, v4: str, v6: str) -> None:
        _ip("-n", host.netns, "addr", "add", v4, "dev", iface)
        _ip("-n", host.netns, "addr", "add", v6, "dev", iface, "nodad")
        _ip("-n", host.netns, "link", "set", iface, "up")

    def _build(self) -> None:
        for name in self.namespaces:
            self._add_netns(name)
        _sysctl(self.lb.netns, "net.ipv4.ip_forward", "1")
        _sysctl(self.lb.netns, "net.ipv6.conf.all.forwarding", "1")

        self._address_link(self.lb, LB_IFACE, self.router or self.client, "eth0", "90")
        if self.router is not None:
            self._route_through(self.router)
        gateway4, gateway6 = self.client.ipv4 - 1, self.client.ipv6 - 1  # .1 of its link
        _ip("-n", self.client.netns, "route", "add", "default", "via", str(gateway4))
        _ip("-n", self.client.netns, "-6", "route", "add", "default", "via", str(gateway6))

        for i, backend in enumerate(self.backends, start=1):
            self._link(self.lb, f"be{i}", backend, "eth0")
            self._address(self.lb, f"be{i}", f"10.91.{i}.1/24", f"fd00:91:{i}::1/64")
            self._address(backend, "eth0", f"10.91.{i}.2/24", f"fd00:91:{i}::2/64")
            _ip("-n", backend.netns, "route", "add", "default", "via", f"10.91.{i}.1")
            _ip("-n", backend.netns, "-6", "route", "add", "default", "via", f"fd00:91:{i}::1")
        for backend in self.backends:
            self._start_server(backend)

    def _address_link(
        self, near: Host, near_iface: str, far: Host, far_iface: str, net: str
    ) -> None:
        """A veth near <-> far on 10.<net>.0.0/24 and fd00:<net>::/64 (near .1, far .2)."""
        self._link(near, near_iface, far, far_iface)
        self._address(near, near_iface, f"10.{net}.0.1/24", f"fd00:{net}::1/64")
        self._address(far, far_iface, f"10.{net}.0.2/24", f"fd00:{net}::2/64")

    def _route_through(self, router: Host) -> None:
        """The router between client and load balancer, its client side at ``router_mtu``."""
        _sysctl(router.netns, "net.ipv4.ip_forward", "1")
        _sysctl(router.netns, "net.ipv6.conf.all.forwarding", "1")
        self._address_link(router, "rt0", self.client, "eth0", "89")
        _ip("-n", router.netns, "link", "set", "rt0", "mtu", str(self.router_mtu))
        _ip("-n", router.netns, "route", "add", "default", "via", "10.90.0.1")
        _ip("-n", router.netns, "-6", "route", "add", "default", "via", "fd00:90::1")
        _ip("-n", self.lb.netns, "route", "add", "10.89.0.0/24", "via", "10.90.0.2")
        _ip("-n", self.lb.netns, "-6", "route", "add", "fd00:89::/64", "via", "fd00:90::2")

    def _start_server(self, backend: Host) -> None:
        start_server(backend, self._servers)

    # -- traffic from the client ---------------------------------------------------------------
    def http_get(
        self,
        address: Address | str,
        port: int,
        *,
        timeout: float = 2.0,
        source_port: int | None = None,
        source: Address | str | None = None,
        path: str = "/",
    ) -> str:
        """GET ``path`` from the client on a new connection; the answer's body (for
        "/", the answering backend's name; "/bytes/N" gives N bytes).

        ``source_port`` fixes the client's port, so the flow's 5-tuple is known;
        ``source`` its address (one of the client's, see :meth:`add_client_address`).
        """
        return http_get(self.client, address, port, timeout, source_port, source, path)

    def connection(
        self, address: Address | str, port: int, *, timeout: float = 2.0
    ) -> HttpConnection:
        """A keep-alive HTTP connection from the client: many requests, one flow."""
        target = ipaddress.ip_address(address)
        sock = self.client.socket(target.version)
        sock.settimeout(timeout)
        sock.connect((str(target), port))
        return HttpConnection(sock)

    def udp_request(
        self,
        address: Address | str,
        port: int,
        *,
        timeout: float = 2.0,
        payload: bytes = b"hello",
    ) -> tuple[str, Address]:
        """One datagram from the client; (the answering backend's name, the reply's source).

        The socket is connected, as a DNS client's is: it takes replies only
        from ``address``, and an ICMP port unreachable raises
        ``ConnectionRefusedError``. A ``payload`` over the link's MTU (1500)
        leaves in IP fragments; ``/bytes/N`` asks for an answer of N bytes.
        """
        target = ipaddress.ip_address(address)
        with self.client.socket(target.version, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((str(target), port))
            sock.send(payload)
            data, source = sock.recvfrom(65535)
        return data.decode().strip(), ipaddress.ip_address(source[0])

    def add_client_address(self, address: Address | str) -> Address:
        """Give the client another address on its link (a second client, as the
        load balancer sees it); it goes with the sandbox."""
        added = ipaddress.ip_address(address)
        length = 24 if added.version == 4 else 64
        extra = ["nodad"] if added.version == 6 else []
        _ip("-n", self.client.netns, "addr", "add", f"{added}/{length}", "dev", "eth0", *extra)
        return added


class HttpConnection:
    """One client TCP connection carrying HTTP/1.1 requests."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def get(self, path: str = "/") -> str:
        self.socket.sendall(f"GET {path} HTTP/1.1\r\nHost: sandbox\r\n\r\n".encode())
        return _http_body(self.socket, keep_alive=True)

    def read(self) -> str:
        """The body of the answer to a request sent on the socket already."""
        return _http_body(self.socket)

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> HttpConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _http_body(sock: socket.socket, *, keep_alive: bool = False) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed mid-response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        None,
    )
    while length is None or len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return body.decode().strip()


def http_get(
    host: Host,
    address: Address | str,
    port: int,
    timeout: float = 2.0,
    source_port: int | None = None,
    source: Address | str | None = None,
    path: str = "/",
) -> str:
    """GET ``path`` from ``host`` on a new connection: the answer's body."""
    target = ipaddress.ip_address(address)
    with host.socket(target.version) as sock:
        sock.settimeout(timeout)
        if source_port is not None or source is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((str(source or ""), source_port or 0))
        sock.connect((str(target), port))
        request = f"GET {path} HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        return _http_body(sock)


def start_server(host: Host, processes: list[subprocess.Popen[str]]) -> None:
    """The sandbox's HTTP and UDP server in ``host``, answering with its name."""
    server = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            host.netns,
            sys.executable,
            "-m",
            "pyebpflb.testing.servers",
            "--name",
            host.name,
            "--port",
            str(BACKEND_PORT),
        ],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_die_with_parent,
    )
    processes.append(server)
    assert server.stdout is not None
    if _readline(server.stdout, timeout=10.0) != "ready":
        raise RuntimeError(f"the server of {host.name} did not start")


def stop(processes: list[subprocess.Popen[Any]]) -> None:
    """Terminate ``processes`` (killing what does not stop within 5 s) and forget them."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()
    processes.clear()


def _readline(stream: IO[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([stream], [], [], deadline - time.monotonic())[0]:
            return stream.readline().strip()
    return ""


__all__ = [
    "BACKEND_PORT",
    "LB_IFACE",
    "Host",
    "HttpConnection",
    "Namespaces",
    "Sandbox",
    "http_get",
    "start_server",
]
