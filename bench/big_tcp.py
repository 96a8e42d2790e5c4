"""`python -m bench.big_tcp`: a 16 MB IPv6 upload through the sandbox's router, with and
without BIG TCP (GSO packets over 64 KiB), straight to the backend and through a VIP.

Shows what the datapath's BIG TCP support meets on this kernel: the upload is slow
through a forwarding router with BIG TCP whether or not a datapath is attached (the
kernel's forwarding of jumbo aggregates, not the translation), so `make test` cannot
tell translated aggregates from retransmitted small segments by timing or bytes.
"""

from __future__ import annotations

import os
import subprocess
import time

import pyebpflb as lb
from pyebpflb.testing.sandbox import Sandbox, _http_body

VIP = "fd00:96::12"
SIZE = 16 << 20


def big_tcp(sandbox: Sandbox) -> None:
    """IPv6 BIG TCP on every link: GSO packets up to 185,000 bytes (Linux 5.19)."""
    links = [(sandbox.client.netns, "eth0"), (sandbox.lb.netns, sandbox.lb.iface)]
    for i, backend in enumerate(sandbox.backends, start=1):
        links += [(backend.netns, "eth0"), (sandbox.lb.netns, f"be{i}")]
    for netns, iface in links:
        for knob in ("gso_max_size", "gro_max_size"):
            subprocess.run(
                ["ip", "-n", netns, "link", "set", "dev", iface, knob, "185000"], check=True
            )


def upload(sandbox: Sandbox, address: str, port: int) -> float:
    """Seconds to POST SIZE bytes and read the backend's count of them."""
    started = time.monotonic()
    with sandbox.client.socket(6) as sock:
        sock.settimeout(60.0)
        sock.connect((address, port))
        head = f"POST / HTTP/1.1\r\nHost: bench\r\nContent-Length: {SIZE}\r\n\r\n"
        sock.sendall(head.encode() + b"y" * SIZE)
        if _http_body(sock) != str(SIZE):
            raise RuntimeError("the backend did not get every byte")
    return time.monotonic() - started


def main() -> None:
    for big in (False, True):
        with (
            Sandbox(backends=1, prefix="pyebpflb-bigtcp") as sandbox,
            lb.Datapath(f"bigtcp-{os.getpid()}", netns=sandbox.lb.netns) as dp,
        ):
            if big:
                big_tcp(sandbox)
            (backend,) = sandbox.backends
            direct = upload(sandbox, str(backend.ipv6), 8080)  # no datapath yet
            dp.attach(sandbox.lb.iface)
            dp.sync([lb.Service(VIP, 80, name="bulk", backends=[lb.Backend(backend.ipv6, 8080)])])
            through = upload(sandbox, VIP, 80)
            label = "BIG TCP (185,000)" if big else "GSO 64 KiB"
            print(
                f"{label:<18} direct, no datapath {direct:6.2f} s, through the VIP {through:6.2f} s"
            )


if __name__ == "__main__":
    main()
