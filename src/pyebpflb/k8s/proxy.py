"""kube-proxy's service half as a library: :class:`ServiceProxy` keeps the Services and
EndpointSlices a watch delivers and programs a datapath with what changed."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from pyebpflb.k8s.netpol import NetworkPolicyTranslator
from pyebpflb.k8s.translate import _get, _labelled_away, _namespace, translate
from pyebpflb.model import Node, Policy, Service

EVENTS = ("ADDED", "MODIFIED", "DELETED")
# A sync changing at least this many Services writes them in one datapath sync.
BATCH_FROM = 64
Ref = tuple[str, str]  # (namespace, name)
SERVICE_KINDS = ("Service", "EndpointSlice")
POLICY_KINDS = ("Pod", "Namespace", "NetworkPolicy")


class ServiceProxy:
    """kube-proxy's service half for a controller: feed it what the API server says
    (``on_service``, ``on_endpointslice`` with ADDED/MODIFIED/DELETED and the object as
    the API returns it, or ``replace_all`` after a list), and :meth:`sync` programs
    ``datapath`` with what changed since the last sync.

    As kube-proxy: nothing is programmed before both initial lists arrived
    (``mark_synced("Service")``, ``mark_synced("EndpointSlice")``, or ``replace_all``;
    kube-proxy's ``isInitialized``), so no Service briefly loses its endpoints at start;
    syncs are at least ``min_sync_period`` seconds apart (``minSyncPeriod``; ``sync``
    returns False when it is too early, and :attr:`pending` says a change waits);
    objects labelled for another proxy or headless are ignored (its label selector).
    ``node`` (default: the datapath's) is whose topology hints count.
    A Service that cannot be translated keeps what it had, and its problem is recorded
    in :attr:`events` as a Kubernetes Event (``type: Warning``, ``reason:
    FailedToProgram``) and logged; the others are programmed.

    ``network_policy=True``: it enforces NetworkPolicies too, fed Pods, Namespaces and
    NetworkPolicies (``on_pod``, ``on_namespace``, ``on_network_policy``, or
    ``replace``); their lists count for :attr:`initialized`. A sync that follows a
    change of those installs the policies of :class:`~pyebpflb.k8s.NetworkPolicyTranslator`
    (only those a change alters are compiled and written again), leaving the services
    and the datapath's other policies (names that are no NetworkPolicy's) alone. A
    NetworkPolicy that cannot be translated is reported as a Warning Event and left out.
    """

    def __init__(
        self,
        datapath: Any,
        *,
        node: Node | None = None,
        min_sync_period: float = 1.0,
        clock: Any = None,
        network_policy: bool = False,
    ) -> None:
        import time

        if isinstance(min_sync_period, bool) or not isinstance(min_sync_period, int | float):
            raise ValueError(f"min_sync_period must be seconds, got {min_sync_period!r}")
        if min_sync_period < 0:
            raise ValueError(f"min_sync_period must be >= 0 seconds, got {min_sync_period!r}")
        if node is not None and not isinstance(node, Node):
            raise ValueError(f"node must be a pyebpflb.Node (its name and zone), got {node!r}")
        self.datapath = datapath
        # Topology hints and Local traffic policies are the node's: the datapath's.
        self.node = node if node is not None else getattr(datapath, "node", None)
        self.min_sync_period = float(min_sync_period)
        self._clock = clock or time.monotonic
        self._services: dict[Ref, dict[str, Any]] = {}
        self._slices: dict[Ref, dict[str, dict[str, Any]]] = {}  # service -> slice name -> slice
        self._programmed: dict[Ref, list[Service]] = {}
        self._dirty: set[Ref] = set()
        self._synced: set[str] = set()
        self._last_sync: float | None = None
        self._adopted = False
        self._failed: dict[Ref, str] = {}  # refused by the datapath: tried at each sync
        self.events: list[dict[str, Any]] = []
        self.network_policy = bool(network_policy)
        self.kinds = SERVICE_KINDS + (POLICY_KINDS if network_policy else ())
        self.policies = NetworkPolicyTranslator()
        self._policies_dirty = False
        self._policy_problems: set[str] = set()  # reported already
        self._policies_refused: str | None = None
        self._policies_in_force = 0  # NetworkPolicies whose policies the datapath holds
        self._policies_failed = 0

    # -- what the API server says ----------------------------------------------------------
    @staticmethod
    def _check_event(event: str) -> str:
        if event not in EVENTS:
            raise ValueError(f"event must be one of {', '.join(EVENTS)}, got {event!r}")
        return event

    def on_service(self, event: str, obj: dict[str, Any]) -> None:
        self._check_event(event)
        obj = {**obj, "kind": "Service"}  # a list's items carry no kind
        ref = (_namespace(obj), str(_get(obj, "metadata.name", "")))
        if event == "DELETED" or _labelled_away(obj) is not None:
            self._services.pop(ref, None)
        else:
            self._services[ref] = obj
        self._dirty.add(ref)

    def on_endpointslice(self, event: str, obj: dict[str, Any]) -> None:
        self._check_event(event)
        obj = {**obj, "kind": "EndpointSlice"}
        labels = _get(obj, "metadata.labels", None) or {}
        owner = labels.get("kubernetes.io/service-name")
        if not owner:
            return  # a slice of no Service (kube-proxy ignores it too)
        ref = (_namespace(obj), str(owner))
        name = str(_get(obj, "metadata.name", ""))
        slices = self._slices.setdefault(ref, {})
        if event == "DELETED" or _labelled_away(obj) is not None:
            slices.pop(name, None)
        else:
            slices[name] = obj
        if not slices:
            del self._slices[ref]
        self._dirty.add(ref)

    def on_pod(self, event: str, obj: dict[str, Any]) -> None:
        self._policy_event(self.policies.on_pod, event, {**obj, "kind": "Pod"})

    def on_namespace(self, event: str, obj: dict[str, Any]) -> None:
        self._policy_event(self.policies.on_namespace, event, {**obj, "kind": "Namespace"})

    def on_network_policy(self, event: str, obj: dict[str, Any]) -> None:
        self._policy_event(self.policies.on_network_policy, event, obj)

    def _policy_event(self, feed: Any, event: str, obj: dict[str, Any]) -> None:
        self._check_event(event)
        if not self.network_policy:
            raise ValueError("this proxy enforces no NetworkPolicy (network_policy=False)")
        feed(event, obj)
        self._policies_dirty = True

    def replace(self, kind: str, objects: Iterable[dict[str, Any]]) -> None:
        """What a list of ``kind`` (one of :attr:`kinds`) returned, at start or after a
        ``410 Gone``: its cache becomes exactly that, and the list is synced. Services
        whose objects did not change are not touched by the next sync."""
        self._check_kind(kind)
        if kind in POLICY_KINDS:
            self.policies.replace(kind, objects)
            self._policies_dirty = True
            self._synced.add(kind)
            return
        if kind == "Service":
            before, add = set(self._services), self.on_service
            self._services = {}
        else:
            before, add = set(self._slices), self.on_endpointslice
            self._slices = {}
        for obj in objects:
            try:
                add("ADDED", obj)
            except (TypeError, ValueError, AttributeError) as exc:  # not an object at all
                logging.getLogger("pyebpflb.k8s").warning(
                    "%s list: item skipped: %s (%.80r)", kind, exc, obj
                )
        self._dirty |= before
        self._synced.add(kind)

    def replace_all(
        self, services: Iterable[dict[str, Any]], endpointslices: Iterable[dict[str, Any]]
    ) -> None:
        """What a relist of both returned: the caches become exactly that; both lists
        are synced."""
        self.replace("Service", services)
        self.replace("EndpointSlice", endpointslices)

    def _check_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            raise ValueError(
                f"kind must be one of {', '.join(map(repr, self.kinds))}, got {kind!r}"
                + ("" if self.network_policy else " (network_policy=True adds the policy kinds)")
            )

    def mark_synced(self, kind: str) -> None:
        """The initial list of ``kind`` (one of :attr:`kinds`) is complete."""
        self._check_kind(kind)
        self._synced.add(kind)

    @property
    def initialized(self) -> bool:
        return self._synced == set(self.kinds)

    @property
    def programmed(self) -> list[str]:
        """The Services (``namespace/name``) this proxy has programmed."""
        return [f"{ns}/{name}" for ns, name in sorted(self._programmed)]

    @property
    def refused(self) -> dict[str, str]:
        """The Services (``namespace/name``) the datapath refused at the last sync, and
        why; they are tried again at each later sync."""
        return {f"{ns}/{name}": why for (ns, name), why in sorted(self._failed.items())}

    @property
    def pending(self) -> bool:
        """A change waits for a sync."""
        return bool(self._dirty) or self._policies_dirty

    # -- programming -----------------------------------------------------------------------
    def sync(self, *, force: bool = False) -> bool:
        """Program what changed; False (and nothing done) before both lists arrived or
        sooner than ``min_sync_period`` after the last sync (unless ``force``). A Service
        the datapath refuses (a frontend another Service holds, a full map) gets a
        Warning Event, keeps what it had of it, and is tried again at each later sync."""

        if not self.initialized:
            return False
        now = self._clock()
        if (
            not force
            and self._last_sync is not None
            and now - self._last_sync < self.min_sync_period
        ):
            return False
        self._last_sync = now
        if not self._adopted:
            self._adopt()
        # Those the datapath refused last time are tried again: what held them may be gone.
        wanted: dict[Ref, list[Service]] = {}
        for ref in sorted(self._dirty | set(self._failed)):
            services = self._wanted(ref)
            if services is not None and set(services) != set(self._programmed.get(ref, [])):
                wanted[ref] = services
        self._dirty = set()
        refused: dict[Ref, str] = {}
        if len(wanted) < BATCH_FROM or not self._write_all(wanted):
            pending = sorted(wanted)
            while pending:
                refused = {}
                for ref in pending:
                    problem = self._write(ref, wanted[ref])
                    if problem is not None:
                        refused[ref] = problem
                # One that took a frontend another was leaving may fit now: again, while
                # that helps.
                pending = sorted(refused) if len(refused) < len(pending) else []
        for ref, problem in refused.items():
            if self._failed.get(ref) != problem:
                self._report(ref, problem)
        self._failed = refused
        if self._policies_dirty or self._policies_refused is not None:
            self._sync_policies()
        return True

    def _sync_policies(self) -> None:
        """Install the NetworkPolicies' translation, the datapath's other policies kept.
        Refused by the datapath (a full map): what it had stays, a log line says why, and
        the next sync tries again."""
        from pyebpflb.errors import PyEbpfLbError

        self._policies_dirty = False
        done = self.policies.result()
        for problem in done.problems:
            if problem not in self._policy_problems:
                self._report_object(problem, "NetworkPolicy")
        self._policy_problems = set(done.problems)
        self._policies_failed = len([p for p in done.problems if p.startswith("NetworkPolicy ")])
        try:
            self.datapath.set_policies(done.policies, keep=lambda p: not _made_by_k8s(p))
        except (ValueError, PyEbpfLbError) as exc:
            problem = f"NetworkPolicies: {exc}"
            if problem != self._policies_refused:
                logging.getLogger("pyebpflb.k8s").warning("%s", problem)
            self._policies_refused = problem
            return
        self._policies_refused = None
        self._policies_in_force = len({origin for origin, _ in done.origins.values()})

    @property
    def network_policies(self) -> dict[str, int]:
        """NetworkPolicies ``in force`` (translated and installed: those selecting no
        pod yet make no policy), ``failed`` (could not be translated) and ``refused``
        (1 while the datapath refuses the translation, which is tried at each sync), as
        of the last sync (read from any thread: nothing is translated here)."""
        return {
            "in force": self._policies_in_force,
            "failed": self._policies_failed,
            "refused": int(self._policies_refused is not None),
        }

    def _report_object(self, problem: str, kind: str) -> None:
        """A Warning Event about the object a problem names ("Kind namespace/name: ...")."""
        logging.getLogger("pyebpflb.k8s").warning("%s", problem)
        where = problem.split(":", 1)[0].split()
        namespace, _, name = (where[-1] if where else "").partition("/")
        obj = {"kind": kind, "metadata": {"namespace": namespace or None, "name": name}}
        self.events.append(_event(obj, problem, self.node.name if self.node else None))

    def _wanted(self, ref: Ref) -> list[Service] | None:
        """What ``ref`` translates to now; None when it cannot be translated (reported:
        it keeps what it had, the same objects failing the same way)."""
        obj = self._services.get(ref)
        if obj is None:
            return []
        done = translate([obj, *self._slices.get(ref, {}).values()], node=self.node)
        for problem in done.problems:
            self._report(ref, problem)
        return None if done.problems else done.services

    def _write_all(self, wanted: dict[Ref, list[Service]]) -> bool:
        """Many Services changed (the first sync, a relist): one datapath sync, all or
        nothing, instead of a write each; False (nothing done) when the datapath
        refuses it, to be written one by one and the refusal pinned on its Service."""
        from pyebpflb.errors import PyEbpfLbError

        stale = {s.key for ref in wanted for s in self._programmed.get(ref, [])}
        kept = [s for s in self.datapath.services if s.key not in stale]
        new = [s for services in wanted.values() for s in services]
        fronts = [part.key for s in [*kept, *new] for part in s.frontends()]
        if len(fronts) != len(set(fronts)):
            return False  # two want one frontend: find which, one by one
        try:
            self.datapath.sync([*kept, *new])
        except (ValueError, PyEbpfLbError):
            return False
        for ref, services in wanted.items():
            if services:
                self._programmed[ref] = services
            else:
                self._programmed.pop(ref, None)
        return True

    def _write(self, ref: Ref, wanted: list[Service]) -> str | None:
        """Make the datapath hold ``wanted`` for ``ref``; the problem, if the datapath
        refuses a part (the rest is done, what it had of that part stays)."""
        from pyebpflb.errors import PyEbpfLbError

        old = self._programmed.get(ref, [])
        keys = {s.key for s in wanted}
        held = [s for s in old if s.key in keys]
        problem: str | None = None
        try:
            for gone in old:
                if gone.key not in keys:
                    self.datapath.remove(gone)
            for service in wanted:
                if service not in old:
                    # Not replace=True: a frontend another Service holds is refused,
                    # never taken from it.
                    self.datapath.upsert(service)
                    held = [s for s in held if s.key != service.key] + [service]
        except (ValueError, PyEbpfLbError) as exc:
            problem = f"Service {ref[0]}/{ref[1]}: {exc}"
        if held:
            self._programmed[ref] = held
        else:
            self._programmed.pop(ref, None)
        return problem

    def _report(self, ref: Ref, problem: str) -> None:
        logging.getLogger("pyebpflb.k8s").warning("%s", problem)
        obj = self._services.get(ref) or {"metadata": {"namespace": ref[0], "name": ref[1]}}
        host = self.node.name if self.node else None
        self.events.append(_event({**obj, "kind": "Service"}, problem, host))

    def _adopt(self) -> None:
        """At the first sync, what an earlier proxy (a restarted agent) programmed is this
        one's: the datapath's services named ``namespace/name``, as translation names
        them. Those the API server no longer has are removed; those unchanged are not
        touched, so their connections go on."""
        self._adopted = True
        for service in self.datapath.services:
            namespace, slash, name = service.name.partition("/")
            if not slash or not namespace or not name or "/" in name:
                continue
            ref = (namespace, name)
            self._programmed.setdefault(ref, []).append(service)
            self._dirty.add(ref)


def _made_by_k8s(policy: Policy) -> bool:
    """Is ``policy`` named as NetworkPolicies are translated (``namespace/name``, with
    ``:egress``, ``#n`` or ``:node IP``), with subjects? As Services named
    ``namespace/name``, those are the proxy's: a restarted agent adopts them and removes
    those whose NetworkPolicy is gone."""
    base = policy.name.split(":", 1)[0].split("#", 1)[0]
    namespace, slash, name = base.partition("/")
    return bool(slash and namespace and name and "/" not in name and policy.subjects)


def _event(obj: dict[str, Any], message: str, node: str | None = None) -> dict[str, Any]:
    """A Kubernetes Event (core/v1) about ``obj``."""
    import datetime
    import uuid

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = str(_get(obj, "metadata.name", ""))
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}", "namespace": _namespace(obj)},
        "type": "Warning",
        "reason": "FailedToProgram",
        "message": message,
        "involvedObject": {
            "apiVersion": "v1",
            "kind": obj.get("kind", "Service"),
            "namespace": _namespace(obj),
            "name": name,
            "uid": str(_get(obj, "metadata.uid", "")),
            "resourceVersion": str(_get(obj, "metadata.resourceVersion", "")),
        },
        "source": {"component": "pyebpflb", "host": node} if node else {"component": "pyebpflb"},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


__all__ = ["EVENTS", "POLICY_KINDS", "SERVICE_KINDS", "ServiceProxy"]
