"""Prometheus metrics of a datapath: a collector a program registers.

::

    from prometheus_client import REGISTRY, start_http_server
    from pyebpflb.metrics import DatapathCollector

    REGISTRY.register(DatapathCollector(dp))
    start_http_server(9090)

Every scrape reads the kernel's counters (per-CPU, summed). Names follow
Prometheus' conventions: counters end in ``_total``, bytes say so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from pyebpflb.datapath import Datapath, DatapathStats
    from pyebpflb.k8s import Watcher


class DatapathCollector(Collector):
    """The counters and map fill levels of ``datapath``, read at each scrape."""

    def __init__(self, datapath: Datapath) -> None:
        self.datapath = datapath

    def collect(self) -> Iterator[Metric]:
        stats = self.datapath.stats()
        yield from self._services(stats)
        yield from self._rules(stats)
        yield from self._drops(stats)
        yield self._events(stats)
        yield from self._conntrack(stats)
        yield from self._maps()

    def _services(self, stats: DatapathStats) -> Iterator[Metric]:
        labels = ["datapath", "service", "vip", "port", "protocol"]
        packets = CounterMetricFamily(
            "pyebpflb_service_packets", "Packets sent to a service", labels=labels
        )
        sent = CounterMetricFamily(
            "pyebpflb_service_bytes", "Bytes sent to a service", labels=labels
        )
        backend_labels = [*labels, "backend"]
        be_packets = CounterMetricFamily(
            "pyebpflb_backend_packets", "Packets sent to a backend", labels=backend_labels
        )
        be_bytes = CounterMetricFamily(
            "pyebpflb_backend_bytes", "Bytes sent to a backend", labels=backend_labels
        )
        replies = CounterMetricFamily(
            "pyebpflb_service_reply_packets", "Replies from a service's backends", labels=labels
        )
        reply_bytes = CounterMetricFamily(
            "pyebpflb_service_reply_bytes", "Reply bytes from a service's backends", labels=labels
        )
        be_replies = CounterMetricFamily(
            "pyebpflb_backend_reply_packets", "Replies from a backend", labels=backend_labels
        )
        be_reply_bytes = CounterMetricFamily(
            "pyebpflb_backend_reply_bytes", "Reply bytes from a backend", labels=backend_labels
        )
        for service_stats in stats.services:
            svc = service_stats.service
            values = [self.datapath.name, svc.name, str(svc.vip), str(svc.port), svc.protocol.value]
            packets.add_metric(values, service_stats.packets)
            sent.add_metric(values, service_stats.bytes)
            replies.add_metric(values, service_stats.replies.packets)
            reply_bytes.add_metric(values, service_stats.replies.bytes)
            for backend, traffic in service_stats.backends.items():
                be_packets.add_metric([*values, str(backend)], traffic.packets)
                be_bytes.add_metric([*values, str(backend)], traffic.bytes)
            for backend, traffic in service_stats.backend_replies.items():
                be_replies.add_metric([*values, str(backend)], traffic.packets)
                be_reply_bytes.add_metric([*values, str(backend)], traffic.bytes)
        return iter(
            (packets, sent, be_packets, be_bytes, replies, reply_bytes, be_replies, be_reply_bytes)
        )

    def _rules(self, stats: DatapathStats) -> Iterator[Metric]:
        rule_labels = ["datapath", "policy", "rule"]
        rule_packets = CounterMetricFamily(
            "pyebpflb_policy_rule_packets", "Packets a policy rule matched", labels=rule_labels
        )
        rule_bytes = CounterMetricFamily(
            "pyebpflb_policy_rule_bytes", "Bytes a policy rule matched", labels=rule_labels
        )
        for name, rules in stats.policies.items():
            for index, traffic in enumerate(rules):
                rule_packets.add_metric([self.datapath.name, name, str(index)], traffic.packets)
                rule_bytes.add_metric([self.datapath.name, name, str(index)], traffic.bytes)
        return iter((rule_packets, rule_bytes))

    def _drops(self, stats: DatapathStats) -> Iterator[Metric]:
        drops = CounterMetricFamily(
            "pyebpflb_drops", "Packets dropped or refused", labels=["datapath", "reason"]
        )
        drop_bytes = CounterMetricFamily(
            "pyebpflb_drop_bytes", "Bytes dropped or refused", labels=["datapath", "reason"]
        )
        for reason, traffic in stats.drops.items():
            drops.add_metric([self.datapath.name, reason], traffic.packets)
            drop_bytes.add_metric([self.datapath.name, reason], traffic.bytes)
        return iter((drops, drop_bytes))

    def _events(self, stats: DatapathStats) -> Metric:
        events = CounterMetricFamily(
            "pyebpflb_events",
            "Flow events: sent, lost (ring buffer full), rate_limited",
            labels=["datapath", "outcome"],
        )
        for outcome in ("sent", "lost", "rate_limited"):
            events.add_metric([self.datapath.name, outcome], getattr(stats.events, outcome))
        return events

    def _conntrack(self, stats: DatapathStats) -> Iterator[Metric]:
        labels = ["datapath", "table"]
        entries = GaugeMetricFamily(
            "pyebpflb_conntrack_entries", "Entries in a conntrack table (two a flow)", labels=labels
        )
        most = GaugeMetricFamily(
            "pyebpflb_conntrack_max_entries", "Entries a conntrack table can hold", labels=labels
        )
        counters = {
            "created": "Flows made in the table",
            "confirmed": "TCP flows moved on to the established table by the backend's answer",
            "orphaned": "Reply halves met after the LRU evicted their flow half",
            "healed": "Flow halves whose evicted reply half was restored",
            "collected": "Dead entries deleted by the garbage collector",
        }
        families = {
            name: CounterMetricFamily(f"pyebpflb_conntrack_{name}", text, labels=labels)
            for name, text in counters.items()
        }
        for t in stats.conntrack:
            entries.add_metric([self.datapath.name, t.table], t.entries)
            most.add_metric([self.datapath.name, t.table], t.max_entries)
            for name, family in families.items():
                family.add_metric([self.datapath.name, t.table], getattr(t, name))
        return iter((entries, most, *families.values()))

    def _maps(self) -> Iterator[Metric]:
        used = GaugeMetricFamily(
            "pyebpflb_map_entries", "Entries in a map", labels=["datapath", "map"]
        )
        size = GaugeMetricFamily(
            "pyebpflb_map_max_entries", "Entries a map can hold", labels=["datapath", "map"]
        )
        for info in self.datapath.maps():
            if info.entries is not None:
                used.add_metric([self.datapath.name, info.name], info.entries)
            size.add_metric([self.datapath.name, info.name], info.max_entries)
        return iter((used, size))


class WatcherCollector(Collector):
    """How a :class:`~pyebpflb.k8s.Watcher` follows the API server (kube-proxy's
    ``sync_proxy_rules`` metrics, and the watch loop's own counts)."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def collect(self) -> Iterator[Metric]:
        watcher, proxy = self.watcher, self.watcher.proxy
        counts = dict(watcher.counts)
        for name, what in (
            ("lists", "Lists of a resource (at start and after 410 Gone)"),
            ("watches", "Watches made (each ends after its timeout and is made again)"),
            ("gone", "410 Gone answers: the version watched from was compacted"),
            ("errors", "Failed requests, each followed by a back-off"),
            ("events", "Warning Events posted to the API server"),
            ("syncs", "Syncs that programmed the datapath"),
        ):
            yield CounterMetricFamily(f"pyebpflb_k8s_{name}", what, value=counts[name])
        yield CounterMetricFamily(
            "pyebpflb_k8s_sync_seconds", "Time spent in syncs", value=watcher.sync_seconds
        )
        yield GaugeMetricFamily(
            "pyebpflb_k8s_last_sync_timestamp_seconds",
            "When the datapath was last synced (kube-proxy's last_timestamp_seconds)",
            value=watcher.last_sync or 0.0,
        )
        yield GaugeMetricFamily(
            "pyebpflb_k8s_services_programmed",
            "Kubernetes Services programmed",
            value=len(proxy.programmed),
        )
        yield GaugeMetricFamily(
            "pyebpflb_k8s_services_refused",
            "Kubernetes Services the datapath refused at the last sync",
            value=len(proxy.refused),
        )
        if proxy.network_policy:
            counts_now = proxy.network_policies
            for key, name, what in (
                ("in force", "in_force", "NetworkPolicies translated and installed"),
                ("failed", "failed", "NetworkPolicies that could not be translated"),
                ("refused", "refused", "1 while the datapath refuses the NetworkPolicies"),
            ):
                yield GaugeMetricFamily(
                    f"pyebpflb_k8s_network_policies_{name}", what, value=counts_now[key]
                )


__all__ = ["DatapathCollector", "WatcherCollector"]
