"""What is measured: connection latency, request rate, per-packet cost, memory."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
import subprocess
import time
from typing import Any

from pyebpflb import objects
from pyebpflb._bpf.netns import entered
from pyebpflb.testing.sandbox import Sandbox

_LINGER_RESET = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT pile-up


def connect_latencies(sandbox: Sandbox, address: str, port: int, samples: int) -> list[float]:
    """Seconds each TCP connect() from the client took (SYN out, SYN-ACK back)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    result = []
    with entered(sandbox.client.netns):
        for _ in range(samples):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.settimeout(2.0)
            started = time.perf_counter()
            sock.connect((address, port))
            result.append(time.perf_counter() - started)
            sock.close()
    return result


def port_reuse(
    sandbox: Sandbox, targets: list[tuple[str, str | None]], port: int, rounds: int = 250
) -> tuple[int, list[str]]:
    """The port-reuse mix: a client with 40 source ports asks each of ``targets`` (address,
    the backend name that must answer, or None for a VIP) in turn, ``rounds`` times, on
    new connections closed with RST. (answers, failures)."""
    answers, failures = 0, []
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    with entered(sandbox.client.netns):
        ports = _free_ports(40)
        for round_ in range(rounds):
            source_port = ports[round_ % 40]
            for address, expected in targets:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.settimeout(2.0)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("", source_port))
                    sock.connect((address, port))
                    sock.sendall(request)
                    answer = b""
                    while chunk := sock.recv(4096):
                        answer += chunk
                    name = answer.rpartition(b"\r\n\r\n")[2].decode().strip()
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    if expected is not None and name != expected:
                        failures.append(f"{address} from port {source_port}: {name!r}")
                    else:
                        answers += 1
                except OSError as exc:
                    failures.append(f"{address} from port {source_port}: {exc!r}")
                finally:
                    sock.close()
    return answers, failures


def _free_ports(count: int) -> list[int]:
    """Ports from 42000 up that a client socket can bind now: the rest of the bench leaves
    wrk's TIME_WAIT sockets on some (they would refuse the bind, not the load balancer)."""
    found: list[int] = []
    port = 42000
    while len(found) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", port))
                found.append(port)
            except OSError:
                pass
        port += 1
    return found


def request_rate(
    sandbox: Sandbox, address: str, port: int, seconds: int, *, keep_alive: bool
) -> tuple[float, int]:
    """(requests per second, socket errors) that wrk gets, from the client namespace."""
    command = ["ip", "netns", "exec", sandbox.client.netns, "wrk", "-t1", "-c8", f"-d{seconds}s"]
    if not keep_alive:
        command += ["-H", "Connection: close"]
    command.append(f"http://{address}:{port}/")
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not rate:
        raise RuntimeError(f"wrk printed no rate: {out}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise RuntimeError(f"wrk got {bad.group(1)} error responses through {address}: {out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return float(rate.group(1)), errors


def packet_cost(program: Any, packet: bytes, repeat: int) -> float:
    """Nanoseconds per run of ``program`` on ``packet`` (BPF_PROG_TEST_RUN)."""
    return float(program.test_run(packet, repeat=repeat).duration_ns)


def new_flow_cost(program: Any, make_packet: Any, flows: int) -> float:
    """Mean nanoseconds of one run on each of ``flows`` distinct new flows."""
    return sum(program.test_run(make_packet(i)).duration_ns for i in range(flows)) / flows


def empty_program() -> Any:
    """The floor: a loaded tc program that returns at once."""
    return objects.open_object("empty").load()


def memlock(bpf_map: Any) -> int:
    """Kernel memory charged to a map (fdinfo's memlock; for hash maps without
    preallocation the kernel counts the elements actually present)."""
    with open(f"/proc/self/fdinfo/{bpf_map.fd}", encoding="utf-8") as info:
        for line in info:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    raise RuntimeError(f"no memlock in fdinfo of map {bpf_map.name}")


def cpu_model() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine() -> dict[str, str]:
    return {
        "cpu": f"{cpu_model()} x {os.cpu_count()}",
        "kernel": os.uname().release,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
