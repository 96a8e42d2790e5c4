"""`make demo`: count real traffic on a veth pair with an eBPF tc program.

Builds two network namespaces joined by a veth pair, attaches pyebpflb's
counter program to the tc ingress and egress of both ends, sends UDP from one
namespace to the other, prints what the kernel counted, then tears everything
down (also when something fails).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pyebpflb
from pyebpflb import InterfaceCounter
from pyebpflb._bpf import libbpf_version

LEFT, RIGHT = f"pyebpflb-demo-l{os.getpid()}", f"pyebpflb-demo-r{os.getpid()}"
LEFT_IP, RIGHT_IP = "10.249.0.1", "10.249.0.2"
DATAGRAMS, SIZE = 1000, 512

SENDER = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range({DATAGRAMS}):
    s.sendto(b"x" * {SIZE}, ("{RIGHT_IP}", 9000))
"""
RECEIVER = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{RIGHT_IP}", 9000))
s.settimeout(5)
print("ready", flush=True)
got = 0
try:
    while got < {DATAGRAMS}:
        s.recv(65536)
        got += 1
except TimeoutError:
    pass
print(got, flush=True)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def build_sandbox() -> None:
    ip("netns", "add", LEFT)
    ip("netns", "add", RIGHT)
    ip(
        "-n",
        LEFT,
        "link",
        "add",
        "veth-l",
        "type",
        "veth",
        "peer",
        "name",
        "veth-r",
        "netns",
        RIGHT,
    )
    for ns, iface, addr in ((LEFT, "veth-l", LEFT_IP), (RIGHT, "veth-r", RIGHT_IP)):
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", iface)
        ip("-n", ns, "link", "set", iface, "up")
        ip("-n", ns, "link", "set", "lo", "up")


def tear_down() -> None:
    for ns in (LEFT, RIGHT):
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL, check=False)


def send_traffic() -> int:
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", RIGHT, sys.executable, "-c", RECEIVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    receiver.stdout.readline()  # "ready": the socket is bound
    subprocess.run(["ip", "netns", "exec", LEFT, sys.executable, "-c", SENDER], check=True)
    received = int(receiver.stdout.readline())
    receiver.wait()
    return received


def main() -> int:
    print(
        f"pyebpflb {pyebpflb.__version__}, libbpf {libbpf_version()}, kernel {os.uname().release}"
    )
    print(f"sandbox: {LEFT} ({LEFT_IP}) <-veth-> {RIGHT} ({RIGHT_IP})")
    build_sandbox()
    try:
        with InterfaceCounter() as counter:
            counter.attach("veth-l", netns_name=LEFT)
            counter.attach("veth-r", netns_name=RIGHT)
            print("counter attached to tc ingress and egress of veth-l and veth-r")
            received = send_traffic()
            print(f"sent {DATAGRAMS} UDP datagrams of {SIZE} bytes, {received} arrived\n")
            print(f"{'namespace':<22}{'interface':<10}{'direction':<10}{'packets':>8}{'bytes':>10}")
            for ns, iface in ((LEFT, "veth-l"), (RIGHT, "veth-r")):
                for direction, count in counter.counts(iface, netns_name=ns).items():
                    print(f"{ns:<22}{iface:<10}{direction:<10}{count.packets:>8}{count.bytes:>10}")
        print("\n(ARP and the like ride along; the counts come from the kernel's per-CPU map,")
        print(" summed over CPUs. Everything is detached and the namespaces are removed.)")
    finally:
        tear_down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
