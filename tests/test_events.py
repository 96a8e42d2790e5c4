"""Flow events, stats and explain: from BPF_PROG_TEST_RUN and from real traffic."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator

import pytest
from lbtest import TC_ACT_SHOT, attached, datapath, packet, run

import pyebpflb as lb
from pyebpflb.testing.sandbox import BACKEND_PORT, HttpConnection, Sandbox

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

WEB = lb.Service("10.96.0.10", 80, name="default/web", backends=[lb.Backend("10.0.1.1", 8080)])
EMPTY = lb.Service("10.96.0.20", 53, "udp", name="default/empty")
CLOSED = lb.Policy("closed", [lb.Rule("deny", "10.9.0.0/16")], default="allow")


def test_trace_drop_and_policy_events() -> None:
    with datapath("ev-kinds") as dp:
        dp.sync([WEB, EMPTY], [CLOSED])
        monitor = dp.open_monitor()
        try:
            run(dp, "lb_ingress", packet(4, "tcp", "10.1.0.5", "10.96.0.10", 1234, 80, flags="S"))
            run(dp, "lb_ingress", packet(4, "udp", "10.1.0.5", "10.96.0.20", 1234, 53))
            run(dp, "lb_ingress", packet(4, "tcp", "10.9.0.5", "10.5.0.1", 1234, 22, flags="S"))
            got = list(monitor.events(0.2))
        finally:
            monitor.close()
        kinds = [(e.type, e.verdict) for e in got]
        assert kinds == [
            ("policy", "allowed"),
            ("trace", "forwarded"),
            ("policy", "allowed"),
            ("drop", "refused"),
            ("policy", "denied"),
            ("drop", "dropped"),
        ]
        trace = got[1]
        assert (str(trace.source), trace.source_port) == ("10.1.0.5", 1234)
        assert (str(trace.destination), trace.destination_port) == ("10.96.0.10", 80)
        assert (trace.service, trace.backend, trace.protocol) == (
            "default/web",
            "10.0.1.1:8080",
            "tcp",
        )
        assert (trace.interface, trace.direction) == ("lo", "ingress")
        assert trace.direction is lb.Direction.INGRESS and trace.verdict is lb.Verdict.FORWARDED
        assert trace.to_dict()["verdict"] == "forwarded" and type(trace.to_dict()["verdict"]) is str
        refused = got[3]
        assert (refused.drop_reason, refused.service) == ("no backend", "default/empty")
        assert refused.drop_reason_code == 1
        denied = got[5]
        assert (denied.drop_reason, denied.policy, denied.rule) == ("policy denied", "closed", 0)
        assert got[0].policy is None and got[0].rule is None  # the default allowed it
        as_json = json.loads(denied.to_json())
        assert as_json["source"] == "10.9.0.5" and as_json["drop_reason"] == "policy denied"
        assert "policy closed rule 0" in str(denied)
        assert dp.event_stats() == lb.EventStats(sent=6, lost=0, rate_limited=0)


def test_events_only_while_someone_reads() -> None:
    with datapath("ev-reader") as dp:
        dp.sync([EMPTY])
        refused = packet(4, "udp", "10.1.0.5", "10.96.0.20", 1234, 53)
        run(dp, "lb_ingress", refused)  # nobody reads: no event, nothing counted lost
        assert dp.event_stats() == lb.EventStats(sent=0, lost=0, rate_limited=0)
        first = dp.open_monitor()
        with pytest.raises(lb.Busy, match=rf"'{dp.name}' already has a monitor: pid {os.getpid()}"):
            dp.open_monitor()  # a second reader would take half of the first one's events
        run(dp, "lb_ingress", refused)
        first.close()  # without reading
        second = dp.open_monitor()
        try:
            # The new reader starts with events from now on: the old one is dropped.
            run(dp, "lb_ingress", packet(4, "udp", "10.1.0.6", "10.96.0.20", 1234, 53))
            got = list(second.events(0.2))
            assert [str(e.source) for e in got] == ["10.1.0.6"]
            # A reader silent for more than 5 s counts as gone.
            stale = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - 6_000_000_000
            dp._object.map("lb_event_reader")[0] = stale
            run(dp, "lb_ingress", refused)
            assert dp.event_stats().sent == 2
        finally:
            second.close()
        assert dp.drops()["no backend"].packets == 4


def test_filters() -> None:
    with datapath("ev-filter") as dp:
        dp.sync([WEB, EMPTY])
        monitor = dp.open_monitor(types=["drop"], address="10.1.0.6")
        try:
            for src in ("10.1.0.5", "10.1.0.6"):
                run(dp, "lb_ingress", packet(4, "udp", src, "10.96.0.20", 1234, 53))
                run(dp, "lb_ingress", packet(4, "tcp", src, "10.96.0.10", 1, 80, flags="S"))
            got = list(monitor.events(0.2))
        finally:
            monitor.close()
        assert [(e.type, str(e.source)) for e in got] == [("drop", "10.1.0.6")]
        with pytest.raises(ValueError, match="event types must be among"):
            dp.open_monitor(types=["traces"])


def test_a_flood_is_counted_not_lost_silently() -> None:
    with datapath("ev-flood") as dp:
        dp.sync([WEB], [lb.Policy("closed", default="deny")])
        monitor = dp.open_monitor(types=["drop"], queue_size=1000)
        try:
            # 100,000 denied packets in one burst: a policy and a drop event each.
            syn = packet(4, "tcp", "10.9.0.5", "10.5.0.1", 1234, 22, flags="S")
            assert (
                dp._object.program("lb_ingress").test_run(bytes(syn), repeat=100_000).retval
                == TC_ACT_SHOT
            )
            stats = dp.event_stats()
            assert stats.sent + stats.lost + stats.rate_limited == 200_000
            assert stats.rate_limited > 0  # 10,000 a second per CPU by default
            got = list(monitor.events(0.5))
        finally:
            monitor.close()
        print(
            f"\nflood of 100,000 denied packets: {stats}; the monitor received "
            f"{monitor.received}, delivered {len(got)} drop events, overflowed {monitor.overflowed}"
        )
        # What the kernel sent was received: the drop events (up to the queue's size,
        # the rest counted as overflowed), the policy events filtered out.
        assert monitor.received == stats.sent
        assert len(got) == 1000  # the queue's bound: memory stays bounded
        # Events alternate policy, drop: half of those sent were drops, and each was
        # either delivered or counted as overflowed.
        assert abs(len(got) + monitor.overflowed - stats.sent / 2) <= 1
        assert len(monitor.queue) == 0
    with datapath("ev-off", events=()) as quiet:
        quiet.sync([WEB], [lb.Policy("closed", default="deny")])
        run(quiet, "lb_ingress", syn)
        assert quiet.event_stats() == lb.EventStats(sent=0, lost=0, rate_limited=0)
        assert quiet.drops()["policy denied"].packets == 1


def test_explain_writes_nothing() -> None:
    with datapath("ev-explain") as dp:
        dp.sync([WEB, EMPTY], [CLOSED])
        before = (len(dp.flows()), dp.stats(), dp.event_stats())
        answer = dp.explain("10.1.0.5:1234", "10.96.0.10:80")
        assert (answer.verdict, answer.service, answer.backend) == (
            lb.Verdict.FORWARDED,
            WEB,
            WEB.backends[0],
        )
        assert (answer.policy_verdict, answer.policy_default) == (lb.Action.ALLOW, True)
        assert (answer.protocol, answer.direction) == (lb.Protocol.TCP, lb.Direction.INGRESS)
        denied = dp.explain("10.9.0.1", "10.96.0.10:80")
        assert (denied.verdict, denied.drop_reason, denied.policy, denied.rule) == (
            lb.Verdict.DROPPED,
            "policy denied",
            "closed",
            0,
        )
        refused = dp.explain("10.1.0.5", "10.96.0.20:53", "udp").to_dict()
        assert (refused["verdict"], refused["service"]) == ("refused", "default/empty")
        passed = dp.explain("[fd00::1]:5", "[fd00::2]:22")
        assert (passed.verdict, passed.service) == (lb.Verdict.PASSED, None)
        assert (len(dp.flows()), dp.stats(), dp.event_stats()) == before
        for bad, message in (
            (("10.1.0.5", "10.96.0.10"), "dst must be IP:PORT"),
            (("nope", "10.96.0.10:80"), "src must be IP"),
            (("10.1.0.5", "[fd00::1]:80"), "different IP versions"),
        ):
            with pytest.raises(ValueError, match=message):
                dp.explain(*bad)
        with pytest.raises(ValueError, match="protocol must be 'tcp' or 'udp', got 'sctp'"):
            dp.explain("10.1.0.5", "10.96.0.10:80", "sctp")


# -- real traffic ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(backends=2, prefix="pyebpflb-ev") as built:
        yield built


@pytest.fixture
def dp(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[lb.Datapath]:
    with attached(sandbox, request) as datapath:
        yield datapath


def services(sandbox: Sandbox) -> list[lb.Service]:
    return [
        lb.Service(
            "10.96.0.10",
            80,
            name="default/my-app-service",
            backends=[lb.Backend(b.ipv4, BACKEND_PORT) for b in sandbox.backends],
        ),
        lb.Service("10.96.0.20", 80, name="default/no-pods"),
    ]


def test_monitor_sees_a_real_connection_and_a_refusal(sandbox: Sandbox, dp: lb.Datapath) -> None:
    dp.sync(services(sandbox))
    monitor = dp.open_monitor(types=["trace", "drop"])
    try:
        answered = sandbox.http_get("10.96.0.10", 80, source_port=41000)
        with pytest.raises(ConnectionRefusedError):
            sandbox.http_get("10.96.0.20", 80)
        got = list(monitor.events(0.3))
    finally:
        monitor.close()
    trace = next(e for e in got if e.type == "trace")
    assert (str(trace.source), trace.source_port) == (str(sandbox.client.ipv4), 41000)
    assert trace.service == "default/my-app-service"
    backend = next(b for b in sandbox.backends if b.name == answered)
    assert trace.backend == f"{backend.ipv4}:{BACKEND_PORT}"
    assert (trace.interface, trace.direction) == (sandbox.lb.iface, "ingress")
    drop = next(e for e in got if e.type == "drop")
    assert (drop.drop_reason, drop.service, drop.verdict) == (
        "no backend",
        "default/no-pods",
        "refused",
    )


def test_counters_match_the_traffic(sandbox: Sandbox, dp: lb.Datapath) -> None:
    dns = lb.Service(
        "10.96.0.53",
        53,
        "udp",
        name="default/dns",
        backends=[lb.Backend(b.ipv4, BACKEND_PORT) for b in sandbox.backends],
    )
    dp.sync([*services(sandbox), dns])
    for _ in range(10):  # each answered before the next: nothing in flight when we read
        sandbox.udp_request("10.96.0.53", 53, payload=b"hello")
    stats = dp.stats(dns)
    frame = 14 + 20 + 8 + len(b"hello")  # what tc sees: Ethernet, IPv4, UDP, payload
    assert (stats.packets, stats.bytes) == (10, 10 * frame)
    assert sum(t.packets for t in stats.backends.values()) == 10
    assert sum(t.bytes for t in stats.backends.values()) == 10 * frame
    everything = dp.stats()
    assert everything.services[-1] == stats
    assert everything.drops["no backend"].packets == 0


def test_async_monitor(sandbox: Sandbox, dp: lb.Datapath) -> None:
    dp.sync(services(sandbox))

    async def watch() -> list[lb.FlowEvent]:
        loop = asyncio.get_running_loop()
        stream = dp.amonitor(types="trace", timeout=5.0)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)  # the monitor is open: events from now on
        await loop.run_in_executor(None, sandbox.http_get, "10.96.0.10", 80)
        seen = [await first]
        await stream.aclose()
        return seen

    (event,) = asyncio.run(watch())
    assert event.type == "trace" and event.service == "default/my-app-service"


def test_explain_agrees_with_a_real_connection(sandbox: Sandbox, dp: lb.Datapath) -> None:
    dp.sync(services(sandbox))
    client = sandbox.client.socket(4)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        client.bind(("", 42000))
        client.settimeout(2)
        client.connect(("10.96.0.10", 80))
        answered = HttpConnection(client).get()
        # The connection is established: explain follows its conntrack entry.
        explained = dp.explain(f"{sandbox.client.ipv4}:42000", "10.96.0.10:80")
    finally:
        client.close()
    backend = next(b for b in sandbox.backends if b.name == answered)
    assert explained.verdict is lb.Verdict.FORWARDED
    assert explained.backend == lb.Backend(backend.ipv4, BACKEND_PORT)
