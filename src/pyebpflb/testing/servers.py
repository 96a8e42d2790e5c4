"""A tiny backend for the sandbox: answers HTTP and UDP with its own name
(``GET /bytes/N``, or a datagram ``/bytes/N``: N bytes instead, for answers bigger
than a packet; ``POST``: the number of bytes it got).

Run as ``python -m pyebpflb.testing.servers --name backend-1 --port 8080`` inside a
network namespace. It listens on every IPv4 and IPv6 address, prints
``ready`` once both sockets are bound, and stops on SIGTERM or when its
parent dies.
"""

from __future__ import annotations

import argparse
import http.server
import signal
import socket
import sys
import threading


def _dual_stack(kind: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", port))
    return sock


def serve(name: str, port: int) -> None:
    body = f"{name}\n".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection, many requests

        def do_GET(self) -> None:
            answer = body
            if self.path == "/peer":  # who the server sees: name and the client's address
                peer = self.client_address[0].removeprefix("::ffff:")
                answer = f"{name} {peer}\n".encode()
            elif self.path.startswith("/bytes/"):  # /bytes/N: N bytes of "x", at most 64 MiB
                size = self.path.removeprefix("/bytes/")
                if not size.isdigit() or int(size) > 1 << 26:
                    self.send_error(400, f"/bytes/N takes N from 0 to {1 << 26}, got {size!r}")
                    return
                answer = b"x" * int(size)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_POST(self) -> None:
            # An upload: the answer is how many bytes arrived.
            left, got = int(self.headers.get("Content-Length", "0")), 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                got, left = got + len(chunk), left - len(chunk)
            answer = f"{got}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6
        daemon_threads = True

        def server_bind(self) -> None:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    httpd = Server(("::", port), Handler)
    udp = _dual_stack(socket.SOCK_DGRAM, port)

    def answer_udp() -> None:
        while True:
            asked, peer = udp.recvfrom(65535)
            # b"/bytes/N": N bytes of "x" (a datagram bigger than a packet), at most 60,000.
            size = asked.removeprefix(b"/bytes/") if asked.startswith(b"/bytes/") else b""
            big = size.isdigit() and int(size) <= 60_000
            udp.sendto(b"x" * int(size) if big else body, peer)

    threading.Thread(target=answer_udp, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    httpd.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    serve(args.name, args.port)


if __name__ == "__main__":
    main()
