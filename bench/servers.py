"""nginx in every backend namespace: the real servers that wrk loads."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import tempfile
import time
from types import TracebackType

from pyebpflb._bpf.netns import entered
from pyebpflb.testing.sandbox import Sandbox, stop

PORT = 80

CONFIG = """
daemon off;
master_process on;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    server {{
        listen {port} backlog=4096;
        listen [::]:{port} backlog=4096;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""


class Nginx:
    """One nginx per backend of ``sandbox``, listening on port 80."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self._dir = tempfile.TemporaryDirectory(prefix="pyebpflb-bench-nginx-")
        self._processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Nginx:
        try:
            for backend in self.sandbox.backends:
                root = pathlib.Path(self._dir.name) / backend.name
                root.mkdir()
                conf = root / "nginx.conf"
                conf.write_text(CONFIG.format(root=root, port=PORT, name=backend.name))
                self._processes.append(
                    subprocess.Popen(
                        [
                            "ip",
                            "netns",
                            "exec",
                            backend.netns,
                            "nginx",
                            "-p",
                            str(root),
                            "-c",
                            str(conf),
                            "-e",
                            str(root / "error.log"),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
                self._wait_listening(backend.netns, str(backend.ipv4))
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _wait_listening(netns: str, address: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with entered(netns), socket.socket() as probe:
                if probe.connect_ex((address, PORT)) == 0:
                    return
            time.sleep(0.02)  # nginx is starting; poll until it accepts
        raise RuntimeError(f"nginx in {netns} did not start listening on {address}:{PORT}")

    def close(self) -> None:
        stop(self._processes)
        self._dir.cleanup()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
