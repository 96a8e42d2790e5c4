"""The list-and-watch loop of a service proxy, on the official ``kubernetes`` client.

One thread per resource (Services, EndpointSlices) does what client-go's reflector
does: list (in pages of ``page_size``, kube-proxy's label selector), then watch from
the list's ``resourceVersion`` with ``allowWatchBookmarks`` and ``timeoutSeconds``;
when a watch ends it watches again from the last version it saw (an event's or a
bookmark's), so nothing is lost; a ``410 Gone`` (the version was compacted) lists
again; any other error waits (exponential back-off, ``backoff`` seconds from the
first to the most) and goes on from where it was. The caller's thread feeds what
they deliver to a :class:`~pyebpflb.k8s.ServiceProxy` in order, syncs it (at most
once per ``min_sync_period``) and posts the proxy's Warning Events to the API server.

A relist replaces one cache (:meth:`ServiceProxy.replace`); the Services whose
objects did not change are not touched, so no Service is ever without its backends
because of a relist or a dropped watch.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pyebpflb.k8s.proxy import SERVICE_KINDS, ServiceProxy

if TYPE_CHECKING:
    from kubernetes.client import CoreV1Api

log = logging.getLogger("pyebpflb.k8s")

# kube-proxy's: Services and slices another proxy serves, and headless ones, are not
# listed at all.
LABEL_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"

# kind -> (API class of the kubernetes client, its list-all-namespaces method)
_LISTS = {
    "Service": ("CoreV1Api", "list_service_for_all_namespaces"),
    "EndpointSlice": ("DiscoveryV1Api", "list_endpoint_slice_for_all_namespaces"),
    # With network_policy: every pod and namespace (peers may be anywhere), no selector.
    "Pod": ("CoreV1Api", "list_pod_for_all_namespaces"),
    "Namespace": ("CoreV1Api", "list_namespace"),
    "NetworkPolicy": ("NetworkingV1Api", "list_network_policy_for_all_namespaces"),
}


class _Gone(Exception):
    """The version watched or listed from is too old: list again."""


def api_client(
    kubeconfig: str | None = None,
    *,
    context: str | None = None,
    api_server: str | None = None,
) -> Any:
    """A ``kubernetes.client.ApiClient``: from ``kubeconfig`` (a path) if given, else
    in-cluster (the pod's service account) when running in a pod, else the default
    kubeconfig (``$KUBECONFIG``, ``~/.kube/config``). ``api_server`` (``https://host:port``)
    replaces the server address: a kube-proxy replacement must not reach the API server
    through the ``kubernetes`` Service it is about to program (Cilium's
    ``k8sServiceHost``/``k8sServicePort``)."""
    import os

    try:
        from kubernetes import client, config
    except ImportError:
        raise RuntimeError(
            "watching a cluster needs the kubernetes client: pip install 'pyebpflb[kubernetes]'"
        ) from None
    configuration = client.Configuration()
    in_pod = os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token")
    if kubeconfig is None and in_pod:
        if api_server is not None:
            # load_incluster_config wants these; the address given wins anyway.
            os.environ.setdefault("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
            os.environ.setdefault("KUBERNETES_SERVICE_PORT", "443")
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    if api_server is not None:
        if not api_server.startswith(("https://", "http://")):
            raise ValueError(
                f"api_server must be a URL like https://10.0.0.1:6443, got {api_server!r}"
            )
        host = configuration.host = api_server.rstrip("/")
        # The kubeconfig loader's token refresh, run before each request, writes the
        # kubeconfig's address back: keep this one.
        refresh = configuration.refresh_api_key_hook
        if refresh is not None:

            def keep_host(done: Any) -> None:
                refresh(done)
                done.host = host

            configuration.refresh_api_key_hook = keep_host
    return client.ApiClient(configuration)


class Watcher:
    """Lists and watches Services and EndpointSlices through ``api_client`` for
    ``proxy`` (and Pods, Namespaces and NetworkPolicies when it enforces them:
    ``ServiceProxy(network_policy=True)``); :meth:`run` until ``stop`` is set.

    ``timeout_seconds``: how long one watch lasts before the server ends it and it is
    made again (client-go picks 5 to 10 minutes); ``page_size``: items per list page;
    ``backoff``: the first and the longest wait after an error; ``record_events``: post
    the proxy's Warning Events to the API server.
    """

    def __init__(
        self,
        proxy: ServiceProxy,
        api_client: Any,
        *,
        timeout_seconds: int = 300,
        page_size: int = 500,
        backoff: tuple[float, float] = (0.5, 30.0),
        record_events: bool = True,
        label_selector: str = LABEL_SELECTOR,
    ) -> None:
        if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, int):
            raise ValueError(f"timeout_seconds must be whole seconds, got {timeout_seconds!r}")
        if timeout_seconds < 1:
            raise ValueError(f"timeout_seconds must be at least 1, got {timeout_seconds!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        first, most = backoff
        if not 0 < first <= most:
            raise ValueError(
                f"backoff must be (first, longest) with 0 < first <= longest: {backoff}"
            )
        self.proxy = proxy
        self.api_client = api_client
        self.timeout_seconds = timeout_seconds
        self.page_size = page_size
        self.backoff = (float(first), float(most))
        self.record_events = record_events
        self.label_selector = label_selector
        self._queue: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._open: set[Any] = set()  # the watch responses being read
        self._posted = 0
        self._core: CoreV1Api | None = None  # what events are posted with, made once
        # What happened, for logs, metrics and tests: lists (initial and after 410),
        # watches made, 410s, errors, events posted.
        self.counts = {"lists": 0, "watches": 0, "gone": 0, "errors": 0, "events": 0, "syncs": 0}
        self.last_error: str | None = None
        self.last_sync: float | None = None  # time.time() of the last sync that ran
        self.sync_seconds = 0.0  # all syncs together

    # -- the reflectors --------------------------------------------------------------------
    def _selector(self, kind: str) -> str:
        return self.label_selector if kind in SERVICE_KINDS else ""

    def _method(self, kind: str) -> Callable[..., Any]:
        from kubernetes import client

        api_class, name = _LISTS[kind]
        method: Callable[..., Any] = getattr(getattr(client, api_class)(self.api_client), name)
        return method

    def _list(self, kind: str) -> tuple[list[dict[str, Any]], str]:
        from kubernetes.client.exceptions import ApiException

        method = self._method(kind)
        items: list[dict[str, Any]] = []
        token = None
        while True:
            try:
                response = method(
                    label_selector=self._selector(kind),
                    limit=self.page_size,
                    _continue=token,
                    _preload_content=False,
                    _request_timeout=60,
                )
            except ApiException as exc:
                if exc.status == 410:
                    raise _Gone(f"{kind} list: {exc.reason}") from None
                raise
            body = json.loads(response.data)
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion", ""))

    def _lines(self, response: Any) -> Iterator[str]:
        buffer = b""
        for piece in response.stream(amt=None, decode_content=False):
            buffer += piece
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    yield line.decode()

    def _watch(self, kind: str, version: str) -> str:
        """One watch from ``version``, its events queued; returns the last version seen."""
        from kubernetes.client.exceptions import ApiException

        try:
            response = self._method(kind)(
                label_selector=self._selector(kind),
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.timeout_seconds,
                watch=True,
                _preload_content=False,
                # The server ends the watch after timeout_seconds; a connection silent
                # for longer than that (and the bookmarks) is dead.
                _request_timeout=(10, self.timeout_seconds + 60),
            )
        except ApiException as exc:
            if exc.status == 410:
                raise _Gone(f"{kind} watch: {exc.reason}") from None
            raise
        self.counts["watches"] += 1
        self._open.add(response)
        if self._stop.is_set():
            self._cut(response)
        try:
            for line in self._lines(response):
                if self._stop.is_set():
                    break
                event = json.loads(line)
                kind_of_event, obj = event.get("type"), event.get("object") or {}
                if kind_of_event == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone(f"{kind} watch: {obj.get('message')}")
                    raise RuntimeError(f"{kind} watch: {obj.get('code')} {obj.get('message')}")
                seen = (obj.get("metadata") or {}).get("resourceVersion")
                if kind_of_event in ("ADDED", "MODIFIED", "DELETED"):
                    self._queue.put((kind_of_event, kind, obj))
                if seen:
                    version = str(seen)  # bookmarks move it on too
        finally:
            self._open.discard(response)
            response.release_conn()
        return version

    @staticmethod
    def _cut(response: Any) -> None:
        """End a watch being read now (its thread is blocked in recv)."""
        import contextlib
        import socket

        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _reflect(self, kind: str) -> None:
        version: str | None = None
        first, most = self.backoff
        delay = first
        while not self._stop.is_set():
            try:
                if version is None:
                    items, version = self._list(kind)
                    self.counts["lists"] += 1
                    self._queue.put(("LIST", kind, items))
                version = self._watch(kind, version)
                delay = first
            except _Gone as exc:
                self.counts["gone"] += 1
                log.info("%s; listing again", exc)
                version = None
            except Exception as exc:  # the network, the API server: wait, go on
                if self._stop.is_set():
                    break  # cut by stop()
                self.counts["errors"] += 1
                self.last_error = f"{kind}: {type(exc).__name__}: {exc}"
                log.warning("watching %ss: %s; again in %.1f s", kind, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, most)

    # -- the caller's thread ---------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Follow the cluster until ``stop`` is set (or :meth:`stop` is called)."""
        if stop is not None:

            def relay() -> None:
                stop.wait()
                self.stop()

            threading.Thread(target=relay, name="watch-stop", daemon=True).start()
        threads = [
            threading.Thread(target=self._reflect, args=(kind,), name=f"watch-{kind}", daemon=True)
            for kind in self.proxy.kinds
        ]
        for thread in threads:
            thread.start()
        proxy = self.proxy
        in_sync = False
        try:
            wait = 0.5
            while not self._stop.is_set():
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = None
                while item is not None:
                    self._deliver(*item)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
                wait = 0.5
                if proxy.pending and proxy.initialized:
                    began = time.monotonic()
                    if not proxy.sync():
                        wait = max(0.01, proxy.min_sync_period / 4)
                        continue
                    self.sync_seconds += time.monotonic() - began
                    self.counts["syncs"] += 1
                    self.last_sync = time.time()
                    if not in_sync:
                        in_sync = True
                        log.info("in sync: %d Services programmed", len(proxy.programmed))
                    self._post_events()
        finally:
            self.stop()
            for thread in threads:
                thread.join(timeout=10)

    def stop(self) -> None:
        """End :meth:`run`: the watches being read are cut."""
        self._stop.set()
        for response in list(self._open):
            self._cut(response)

    def _deliver(self, event: str, kind: str, obj: Any) -> None:
        try:
            if event == "LIST":
                self.proxy.replace(kind, obj)
            else:
                feed = {
                    "Service": self.proxy.on_service,
                    "EndpointSlice": self.proxy.on_endpointslice,
                    "Pod": self.proxy.on_pod,
                    "Namespace": self.proxy.on_namespace,
                    "NetworkPolicy": self.proxy.on_network_policy,
                }[kind]
                feed(event, obj)
        except (TypeError, ValueError, AttributeError) as exc:  # not an object at all
            self.counts["errors"] += 1
            log.warning("%s %s skipped: %s (%.80r)", event, kind, exc, obj)

    def _post_events(self) -> None:
        from kubernetes import client

        events = self.proxy.events[self._posted :]
        self._posted = len(self.proxy.events)
        if not self.record_events:
            return
        if self._core is None:
            self._core = client.CoreV1Api(self.api_client)
        core = self._core
        for event in events:
            try:
                core.create_namespaced_event(
                    event["metadata"]["namespace"],
                    event,  # type: ignore[arg-type]  # a dict is serialized as it is
                    _request_timeout=10,
                )
                self.counts["events"] += 1
            except Exception as exc:  # an event is best effort, as client-go's recorder
                log.warning("posting event %s: %s", event["metadata"]["name"], exc)


def run(
    datapath: Any,
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    api_server: str | None = None,
    stop: threading.Event | None = None,
    min_sync_period: float = 1.0,
    network_policy: bool = False,
    **options: Any,
) -> None:
    """Follow the cluster's Services and EndpointSlices (and, with ``network_policy``,
    its NetworkPolicies) into ``datapath`` until ``stop`` is set: :func:`api_client` +
    :class:`~pyebpflb.k8s.ServiceProxy` + :class:`Watcher` (``options`` are the
    Watcher's)."""
    proxy = ServiceProxy(datapath, min_sync_period=min_sync_period, network_policy=network_policy)
    client = api_client(kubeconfig, context=context, api_server=api_server)
    started = time.monotonic()
    try:
        Watcher(proxy, client, **options).run(stop)
    finally:
        client.close()
        log.info("stopped following the cluster after %.0f s", time.monotonic() - started)


async def arun(datapath: Any, **options: Any) -> None:
    """:func:`run` for asyncio programs: the same loop in a worker thread, until the
    task is cancelled (then it stops, and returns once the loop has ended)."""
    import asyncio

    stop = threading.Event()
    done = asyncio.get_running_loop().run_in_executor(
        None, lambda: run(datapath, stop=stop, **options)
    )
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        stop.set()
        await done
        raise


__all__ = ["LABEL_SELECTOR", "Watcher", "api_client", "arun", "run"]
