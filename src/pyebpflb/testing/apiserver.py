"""A stand-in Kubernetes API server for tests: no kube-apiserver can be installed here.

It speaks the wire protocol the ``kubernetes`` client and pyebpflb's watch loop use,
for the objects a service proxy reads, and nothing more:

- ``GET`` of a collection (all namespaces, or one) returns a ``<Kind>List`` with
  ``metadata.resourceVersion``; ``limit`` and ``continue`` page it from one snapshot
  (a ``continue`` older than the compaction point is ``410 Expired``); ``GET`` of one
  object; ``POST`` of Events (kept in :attr:`ApiServer.events`); discovery
  (``/version``, ``/api``, ``/apis``, each group version's resources).
- ``?watch=1`` streams JSON WatchEvents, one per line, in a chunked response:
  ADDED/MODIFIED/DELETED after ``resourceVersion`` (every change since, in order),
  ``BOOKMARK`` every ``bookmark_interval`` seconds with ``allowWatchBookmarks``, an
  ``ERROR`` event with a ``410`` Status when the version was compacted away, and the
  end of the stream after ``timeoutSeconds``.
- ``labelSelector`` (``key``, ``!key``, ``key=value``, ``key!=value``) and the
  ``metadata.name``/``metadata.namespace`` field selectors, on lists and watches: an
  object that stops matching is DELETED from a watch, one that starts is ADDED.
- A bearer token is required (401 without), as a kubeconfig's user gives it.

The test drives it: :meth:`ApiServer.apply` and :meth:`ApiServer.delete` change
objects (one resourceVersion per change, as etcd's revision), :meth:`compact` forgets
history (later watches from before it get 410), :meth:`drop_watches` cuts every open
watch connection, :meth:`fail` answers the next requests with an error.

What it does not check, and a real API server does: schemas and defaulting (objects
are stored as given, but for ``metadata``), admission, RBAC (any token is every
permission), TLS, protobuf, server-side apply, ``resourceVersionMatch``, list
consistency for ``resourceVersion`` other than the latest, set-based selectors.
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import os
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Self, cast

from pyebpflb._bpf.netns import entered

# kind -> (API group path, plural, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Service": ("/api/v1", "services", True),
    "EndpointSlice": ("/apis/discovery.k8s.io/v1", "endpointslices", True),
    "Node": ("/api/v1", "nodes", False),
    "Namespace": ("/api/v1", "namespaces", False),
    "Pod": ("/api/v1", "pods", True),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "Event": ("/api/v1", "events", True),
}
_API_VERSION = {
    "/api/v1": "v1",
    "/apis/discovery.k8s.io/v1": "discovery.k8s.io/v1",
    "/apis/networking.k8s.io/v1": "networking.k8s.io/v1",
}
Key = tuple[str, str, str]  # kind, namespace ("" if cluster-wide), name


class _Change:
    __slots__ = ("kind", "new", "old", "version")

    def __init__(
        self, version: int, kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> None:
        self.version, self.kind, self.old, self.new = version, kind, old, new


Predicate = Callable[[dict[str, Any]], bool]


def _selector(text: str, kind: str) -> Predicate:
    """A predicate for ``labelSelector`` (kind "label") or ``fieldSelector`` (kind
    "field") text; ValueError if it is not one this server understands."""
    tests = [_requirement(part, kind) for part in (p.strip() for p in text.split(",")) if part]
    return lambda obj: all(test(obj) for test in tests)


def _requirement(part: str, kind: str) -> Predicate:
    if kind == "field":
        key, sep, value = part.partition("=")
        key, value = key.rstrip("="), value.lstrip("=")
        if not sep or key not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f"field selector {part!r}: metadata.name or metadata.namespace")
        field = key.removeprefix("metadata.")
        return lambda obj: str((obj.get("metadata") or {}).get(field, "")) == value
    if " in " in part or " notin " in part:
        raise ValueError(f"label selector {part!r}: set-based requirements are not served")
    if part.startswith("!"):
        return lambda obj: part[1:] not in _labels(obj)
    if "!=" in part:
        key, value = part.split("!=", 1)
        return lambda obj: _labels(obj).get(key) != value
    if "=" in part:
        key, value = part.replace("==", "=").split("=", 1)
        return lambda obj: _labels(obj).get(key) == value
    return lambda obj: part in _labels(obj)


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


class Gone(Exception):
    pass


class ApiServer:
    """The stand-in API server, on ``address`` (port 0: any free one), in ``netns``
    (an ``ip netns`` name, or where this thread is). Use as a context manager."""

    def __init__(
        self,
        *,
        address: str = "127.0.0.1",
        port: int = 0,
        netns: str | None = None,
        token: str = "pyebpflb-test-token",
        bookmark_interval: float = 1.0,
    ) -> None:
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.netns = netns
        self._lock = threading.Condition()
        self._objects: dict[Key, dict[str, Any]] = {}
        self._history: list[_Change] = []
        self._version = 1000
        self._compacted = 0  # watches from before this version are gone
        self._snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._failures: list[tuple[int, str]] = []
        self._watches: set[socket.socket] = set()
        self.requests: list[str] = []  # "GET /api/v1/services?..." as they came
        self.events: list[dict[str, Any]] = []
        self._closed = False
        with entered(netns):
            self._server = _Server((address, port), _Handler, self)
        self._thread: threading.Thread | None = None

    # -- life --------------------------------------------------------------------------------
    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="apiserver", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self.drop_watches()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        host, port = cast(tuple[str, int], self._server.server_address[:2])
        return f"http://{host}:{port}" if ":" not in str(host) else f"http://[{host}]:{port}"

    def kubeconfig(self, path: str | os.PathLike[str]) -> str:
        """Write a kubeconfig for this server (token auth) to ``path``; returns it."""
        import yaml

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "agent", "user": {"token": self.token}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "agent"}}],
            "current-context": "stand-in",
        }
        with open(path, "w") as out:
            yaml.safe_dump(config, out)
        return str(path)

    # -- what the test does ---------------------------------------------------------------------
    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._version

    def apply(self, *objects: dict[str, Any]) -> int:
        """Create or replace each object (``kind`` and ``metadata.name`` required);
        returns the resourceVersion of the last change."""
        with self._lock:
            for obj in objects:
                self._store(copy.deepcopy(obj))
            self._lock.notify_all()
            return self._version

    def delete(self, kind: str, namespace: str, name: str) -> int:
        with self._lock:
            key = (kind, namespace if RESOURCES[kind][2] else "", name)
            old = self._objects.pop(key)
            self._version += 1
            self._history.append(_Change(self._version, kind, old, None))
            self._lock.notify_all()
            return self._version

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._objects[(kind, namespace, name)])

    def compact(self) -> int:
        """Forget the history up to now: a watch or a list page from an older
        resourceVersion gets 410 Gone (etcd compaction)."""
        with self._lock:
            self._compacted = self._version
            self._history.clear()
            self._snapshots.clear()
            return self._version

    def drop_watches(self) -> int:
        """Cut every open watch connection (as a restarting API server or a broken
        network would); returns how many."""
        with self._lock:
            sockets = list(self._watches)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return len(sockets)

    def open_watches(self) -> int:
        with self._lock:
            return len(self._watches)

    def wait_for_watches(self, count: int, timeout: float = 10.0) -> None:
        """Until ``count`` watches are open."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._watches) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._watches)} watches open, waited for {count}")
                self._lock.wait(left)

    def fail(self, status: int = 500, count: int = 1, path: str = "") -> None:
        """Answer the next ``count`` requests whose path starts with ``path`` with
        ``status`` (a Status object, as the API server's errors)."""
        with self._lock:
            self._failures.extend([(status, path)] * count)

    def heal(self) -> None:
        """No more injected failures."""
        with self._lock:
            self._failures.clear()

    # -- inside --------------------------------------------------------------------------------
    def _store(self, obj: dict[str, Any]) -> None:
        kind = obj.get("kind")
        if kind not in RESOURCES:
            raise ValueError(f"kind {kind!r} is not served ({', '.join(RESOURCES)})")
        group, _, namespaced = RESOURCES[kind]
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ValueError(f"{kind} without metadata.name")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (kind, meta.get("namespace", ""), meta["name"])
        old = self._objects.get(key)
        meta["uid"] = (old or {}).get("metadata", {}).get("uid") or str(uuid.uuid4())
        meta.setdefault(
            "creationTimestamp",
            (old or {}).get("metadata", {}).get("creationTimestamp")
            or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        obj.setdefault("apiVersion", _API_VERSION[group])
        self._version += 1
        meta["resourceVersion"] = str(self._version)
        self._objects[key] = obj
        self._history.append(_Change(self._version, kind, old, obj))

    def _route(self, path: str) -> tuple[str, str | None, str | None]:
        """kind, namespace (None: all), name (None: the collection) of a path."""
        parts = path.strip("/").split("/")
        for kind, (group, plural, namespaced) in RESOURCES.items():
            base = group.strip("/").split("/")
            if parts[: len(base)] != base:
                continue
            rest = parts[len(base) :]
            if rest == [plural]:
                return kind, None, None
            if not namespaced and len(rest) == 2 and rest[0] == plural:
                return kind, None, rest[1]
            if namespaced and len(rest) >= 3 and rest[0] == "namespaces" and rest[2] == plural:
                return kind, rest[1], rest[3] if len(rest) == 4 else None
        raise KeyError(path)

    def _matching(self, kind: str, namespace: str | None, test: Predicate) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in sorted(self._objects.items())
            if k == kind and (namespace is None or ns == namespace) and test(o)
        ]

    def _list(
        self, kind: str, namespace: str | None, test: Any, limit: int, token: str
    ) -> dict[str, Any]:
        with self._lock:
            if token:
                if token not in self._snapshots:
                    raise Gone("The provided continue parameter is too old")
                version, items = self._snapshots.pop(token)
            else:
                version, items = self._version, self._matching(kind, namespace, test)
            page, rest = (items[:limit], items[limit:]) if limit else (items, [])
            meta: dict[str, Any] = {"resourceVersion": str(version)}
            if rest:
                following = uuid.uuid4().hex
                self._snapshots[following] = (version, rest)
                meta["continue"] = following
                meta["remainingItemCount"] = len(rest)
        group = RESOURCES[kind][0]
        return {
            "kind": f"{kind}List",
            "apiVersion": _API_VERSION[group],
            "metadata": meta,
            "items": page,
        }

    def _changes(
        self, kind: str, namespace: str | None, test: Any, since: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """The watch events after ``since`` (blocking while none); Gone if compacted."""
        if since < self._compacted:
            raise Gone(f"too old resource version: {since} ({self._compacted})")
        for change in self._history:
            if change.version <= since or change.kind != kind:
                continue
            obj = change.new or change.old
            assert obj is not None
            if namespace is not None and (obj.get("metadata") or {}).get("namespace") != namespace:
                continue
            was = change.old is not None and test(change.old)
            now = change.new is not None and test(change.new)
            if now:
                yield ("MODIFIED" if was else "ADDED"), copy.deepcopy(change.new or {})
            elif was:
                gone = copy.deepcopy(change.old or {})
                gone["metadata"]["resourceVersion"] = str(change.version)
                yield "DELETED", gone


def _discovery(path: str) -> dict[str, Any] | None:
    """What ``/version``, ``/api``, ``/apis`` and each group version say (for clients
    that discover resources, as kopf does); None for other paths."""
    if path == "/version":
        return {"major": "1", "minor": "31", "gitVersion": "v1.31.0-pyebpflb-stand-in"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    groups = sorted({g for g, _, _ in RESOURCES.values() if g.startswith("/apis/")})
    if path == "/apis":
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": g.split("/")[2],
                    "versions": [{"groupVersion": _API_VERSION[g], "version": "v1"}],
                    "preferredVersion": {"groupVersion": _API_VERSION[g], "version": "v1"},
                }
                for g in groups
            ],
        }
    if path in _API_VERSION:
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": _API_VERSION[path],
            "resources": [
                {
                    "name": plural,
                    "singularName": kind.lower(),
                    "namespaced": namespaced,
                    "kind": kind,
                    "verbs": ["create", "get", "list", "watch"],
                }
                for kind, (group, plural, namespaced) in RESOURCES.items()
                if group == path
            ],
        }
    return None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: Any, api: ApiServer) -> None:
        self.api = api
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _status(self, code: int, reason: str, message: str) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _prelude(self) -> tuple[str, dict[str, str]] | None:
        api = self.server.api
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        with api._lock:
            api.requests.append(f"{self.command} {self.path}")
            failure = next((f for f in api._failures if url.path.startswith(f[1])), None)
            if failure is not None:
                api._failures.remove(failure)
        if self.headers.get("Authorization") != f"Bearer {api.token}":
            self._send(401, self._status(401, "Unauthorized", "Unauthorized"))
            return None
        if failure is not None:
            self._send(failure[0], self._status(failure[0], "InternalError", "injected failure"))
            return None
        return url.path, query

    def do_POST(self) -> None:
        found = self._prelude()
        if found is None:
            return
        path, _ = found
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        try:
            kind, namespace, name = self.server.api._route(path)
        except KeyError:
            self._send(404, self._status(404, "NotFound", f"{path} is not served"))
            return
        if kind != "Event" or name is not None or namespace is None:
            self._send(405, self._status(405, "MethodNotAllowed", "only Events are created"))
            return
        body["kind"] = "Event"
        body.setdefault("metadata", {})["namespace"] = namespace
        api = self.server.api
        with api._lock:
            api._store(body)
            api.events.append(copy.deepcopy(body))
            api._lock.notify_all()
        self._send(201, body)

    def do_GET(self) -> None:
        found = self._prelude()
        if found is None:
            return
        path, query = found
        api = self.server.api
        discovered = _discovery(path.rstrip("/"))
        if discovered is not None:
            self._send(200, discovered)
            return
        try:
            kind, namespace, name = api._route(path)
        except KeyError:
            self._send(404, self._status(404, "NotFound", f"the server could not find {path}"))
            return
        try:
            labels = _selector(query.get("labelSelector", ""), "label")
            fields = _selector(query.get("fieldSelector", ""), "field")
        except ValueError as exc:
            self._send(400, self._status(400, "BadRequest", str(exc)))
            return

        def test(obj: dict[str, Any]) -> bool:
            return bool(labels(obj) and fields(obj))

        if name is not None:
            with api._lock:
                obj = api._objects.get((kind, namespace or "", name))
            if obj is None:
                self._send(404, self._status(404, "NotFound", f"{kind.lower()} {name!r} not found"))
            else:
                self._send(200, obj)
            return
        if query.get("watch") in ("1", "true"):
            self._watch(kind, namespace, test, query)
            return
        try:
            limit = int(query.get("limit", "0") or 0)
            body = api._list(kind, namespace, test, limit, query.get("continue", ""))
        except Gone as exc:
            self._send(410, self._status(410, "Expired", str(exc)))
            return
        self._send(200, body)

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, kind: str, namespace: str | None, test: Any, query: dict[str, str]) -> None:
        api = self.server.api
        timeout = float(query.get("timeoutSeconds", "1800") or 1800)
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        deadline = time.monotonic() + timeout
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with api._lock:
            since = int(query.get("resourceVersion") or 0)
            # No version (or "0"): the current objects first, as synthetic ADDED events.
            current = [] if since else api._matching(kind, namespace, test)
            since = since or api._version
            api._watches.add(self.connection)
            api._lock.notify_all()
        try:
            for obj in current:
                self._chunk({"type": "ADDED", "object": obj})
            last_bookmark = time.monotonic()
            while True:
                with api._lock:
                    try:
                        events = list(api._changes(kind, namespace, test, since))
                    except Gone as exc:
                        self._chunk(
                            {"type": "ERROR", "object": self._status(410, "Expired", str(exc))}
                        )
                        break
                    if not events:
                        left = min(deadline, last_bookmark + api.bookmark_interval)
                        api._lock.wait(max(0.0, left - time.monotonic()))
                        if api._closed:
                            break
                        events = list(api._changes(kind, namespace, test, since))
                    since = api._version if not events else since
                for event_type, obj in events:
                    self._chunk({"type": event_type, "object": obj})
                    since = max(since, int(obj["metadata"]["resourceVersion"]))
                now = time.monotonic()
                if now >= deadline:
                    break
                if bookmarks and now - last_bookmark >= api.bookmark_interval:
                    group = RESOURCES[kind][0]
                    self._chunk(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": kind,
                                "apiVersion": _API_VERSION[group],
                                "metadata": {"resourceVersion": str(since)},
                            },
                        }
                    )
                    last_bookmark = now
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client went away, or drop_watches cut it
        finally:
            with api._lock:
                api._watches.discard(self.connection)
            self.close_connection = True


__all__ = ["RESOURCES", "ApiServer"]
