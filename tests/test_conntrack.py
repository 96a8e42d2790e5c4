"""A flow's two conntrack entries have one life (BPF_PROG_TEST_RUN, exact bytes out):
a reply entry is used only while its flow lives, a closing flow gives its tuple up to
the next connection, and a live flow's tuple is never taken over."""

from __future__ import annotations

import gc
import os
import time
import weakref
from collections.abc import Iterator

import pytest
from conftest import PIN_ROOT
from lbtest import TC_ACT_OK, TC_ACT_SHOT, bad_checksums, datapath, packet, run
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

import pyebpflb as lb
from pyebpflb import maps

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

CLIENT, VIP, OTHER_VIP, BACKEND = "10.1.0.5", "10.96.0.10", "10.96.0.11", "10.0.1.1"


def web(vip: str = VIP, name: str = "default/web", protocol: str = "tcp") -> lb.Service:
    return lb.Service(vip, 80, protocol=protocol, name=name, backends=[lb.Backend(BACKEND, 8080)])


@pytest.fixture
def dp(request: pytest.FixtureRequest) -> Iterator[lb.Datapath]:
    with datapath(request.node.name[:40]) as created:
        yield created


def to_vip(flags: str, vip: str = VIP, port: int = 40000) -> object:
    return packet(4, "tcp", CLIENT, vip, port, 80, payload=b"", flags=flags)


def from_backend(flags: str, port: int = 40000) -> object:
    return packet(4, "tcp", BACKEND, CLIENT, 8080, port, payload=b"", flags=flags)


def test_a_reply_after_its_flow_expired_is_not_rewritten() -> None:
    with datapath("expired", ct_timeouts=lb.ConntrackTimeouts(udp=0.2)) as dp:
        dp.upsert(web(protocol="udp"))
        run(dp, "lb_ingress", packet(4, "udp", CLIENT, VIP, 5353, 80))
        answer = packet(4, "udp", BACKEND, CLIENT, 8080, 5353, payload=b"late")
        assert run(dp, "lb_egress", answer)[1][IP].src == VIP  # alive: translated
        time.sleep(0.3)  # past the UDP timeout
        verdict, out = run(dp, "lb_egress", answer)
        assert verdict == TC_ACT_OK and bytes(out) == bytes(answer)  # untouched
        assert dp.conntrack() == []  # both halves went


def test_a_reply_whose_flow_was_evicted_meets_policy_as_unrelated_traffic(
    dp: lb.Datapath,
) -> None:
    dp.sync([web()], [lb.Policy("out", default="deny", direction="egress")])
    run(dp, "lb_ingress", to_vip("S"))
    # The LRU evicts the flow's SERVICE half; its REPLY half is left.
    ct = dp._object.map(maps.CT_SYN)  # unanswered TCP flows
    (service_key,) = [k for k in ct if int(k.dir) == 0]
    ct.delete(service_key)
    verdict, _ = run(dp, "lb_egress", from_backend("SA"))
    assert verdict == TC_ACT_SHOT  # not translated, and egress policy denies it
    assert dp.drops()["policy denied"].packets == 1
    assert [f for f in dp.conntrack() if f.kind == "reply"] == []


def test_a_direct_connection_from_the_port_of_a_reset_vip_flow_is_answered_by_the_backend(
    dp: lb.Datapath,
) -> None:
    dp.upsert(web())
    run(dp, "lb_ingress", to_vip("S"))
    run(dp, "lb_egress", from_backend("SA"))
    run(dp, "lb_ingress", to_vip("R"))  # the client resets the VIP connection
    # ... and connects from the same port straight to the backend.
    direct = packet(4, "tcp", CLIENT, BACKEND, 40000, 8080, payload=b"", flags="S")
    assert bytes(run(dp, "lb_ingress", direct)[1]) == bytes(direct)
    answer = from_backend("SA")
    assert bytes(run(dp, "lb_egress", answer)[1]) == bytes(answer)  # from the backend
    assert dp.conntrack() == []  # the reset flow is gone, both halves


def test_a_direct_syn_never_takes_the_tuple_of_a_live_vip_flow(dp: lb.Datapath) -> None:
    dp.upsert(web())
    run(dp, "lb_ingress", to_vip("S"))
    run(dp, "lb_egress", from_backend("SA"))
    direct = packet(4, "tcp", CLIENT, BACKEND, 40000, 8080, payload=b"", flags="S")
    run(dp, "lb_ingress", direct)
    # The VIP connection lives on: the backend's segments are still its own.
    assert run(dp, "lb_egress", from_backend("A"))[1][IP].src == VIP
    assert {f.kind for f in dp.conntrack()} == {"service", "reply"}


def test_a_half_closed_flow_keeps_its_tuple_until_both_sides_finish(dp: lb.Datapath) -> None:
    dp.upsert(web())
    run(dp, "lb_ingress", to_vip("S"))
    run(dp, "lb_egress", from_backend("SA"))
    run(dp, "lb_ingress", to_vip("FA"))  # the client half-closes
    direct = packet(4, "tcp", CLIENT, BACKEND, 40000, 8080, payload=b"", flags="S")
    run(dp, "lb_ingress", direct)
    assert run(dp, "lb_egress", from_backend("PA"))[1][IP].src == VIP  # still its data


def test_two_services_sharing_a_backend_never_overwrite_a_live_reply_entry(
    dp: lb.Datapath,
) -> None:
    dp.sync([web(), web(OTHER_VIP, "default/other")])
    run(dp, "lb_ingress", to_vip("S"))
    run(dp, "lb_egress", from_backend("SA"))
    # The same client port to the other service, whose only backend is the same:
    # the backend would see one tuple for two connections.
    verdict, _ = run(dp, "lb_ingress", to_vip("S", OTHER_VIP))
    assert verdict == TC_ACT_SHOT
    assert dp.drops()["tuple in use"].packets == 1
    assert run(dp, "lb_egress", from_backend("A"))[1][IP].src == VIP  # the first keeps it


def test_a_new_flow_takes_over_the_tuple_of_a_closing_flow_of_another_service(
    dp: lb.Datapath,
) -> None:
    dp.sync([web(), web(OTHER_VIP, "default/other")])
    run(dp, "lb_ingress", to_vip("S"))
    run(dp, "lb_egress", from_backend("SA"))
    run(dp, "lb_ingress", to_vip("R"))
    _, out = run(dp, "lb_ingress", to_vip("S", OTHER_VIP))
    assert (out[IP].dst, out[TCP].dport) == (BACKEND, 8080)
    assert run(dp, "lb_egress", from_backend("SA"))[1][IP].src == OTHER_VIP
    assert sorted(f.kind for f in dp.conntrack()) == ["reply", "service"]  # the old went
    (flow,) = [f for f in dp.conntrack() if f.kind == "service"]
    assert flow.destination == f"{OTHER_VIP}:80"


def three(vip: str = VIP) -> lb.Service:
    backends = [lb.Backend(f"10.0.1.{i}", 8080) for i in (1, 2, 3)]
    return lb.Service(vip, 80, name="default/three", backends=backends)


def backends_of(dp: lb.Datapath, flags: str, ports: range) -> list[str]:
    return [str(run(dp, "lb_ingress", to_vip(flags, port=p))[1][IP].dst) for p in ports]


def test_a_flow_that_lost_both_entries_returns_to_its_backend(dp: lb.Datapath) -> None:
    dp.upsert(three())
    ports = range(41000, 41060)
    first = backends_of(dp, "S", ports)
    assert len(set(first)) == 3  # the flows spread
    dp.flush_conntrack()  # as if the LRU had evicted them all
    assert backends_of(dp, "A", ports) == first


def test_a_flow_that_lost_its_service_half_returns_to_its_backend(dp: lb.Datapath) -> None:
    dp.upsert(three())
    ports = range(41000, 41060)
    first = backends_of(dp, "S", ports)
    ct = dp._object.map(maps.CT_SYN)  # unanswered TCP flows
    for key in [k for k in ct if int(k.dir) == 0]:
        ct.delete(key)
    assert backends_of(dp, "A", ports) == first
    assert len([f for f in dp.conntrack() if f.kind == "reply"]) == 60  # one each, still


def test_a_lost_reply_half_is_restored_by_the_clients_next_packet(dp: lb.Datapath) -> None:
    dp.upsert(web())
    run(dp, "lb_ingress", to_vip("S"))
    ct = dp._object.map(maps.CT_SYN)  # unanswered TCP flows
    (reply_key,) = [k for k in ct if int(k.dir) == 1]
    ct.delete(reply_key)
    answer = from_backend("SA")
    assert bytes(run(dp, "lb_egress", answer)[1]) == bytes(answer)  # lost: untranslated
    # The check runs when the flow's clock enters a new 2^30 ns period.
    time.sleep(1.1)
    run(dp, "lb_ingress", to_vip("A"))
    assert run(dp, "lb_egress", answer)[1][IP].src == VIP


def test_conntrack_lists_live_flows_only_unless_asked_for_the_dead() -> None:
    with datapath("listing", ct_timeouts=lb.ConntrackTimeouts(udp=0.2)) as dp:
        dp.upsert(web(protocol="udp"))
        run(dp, "lb_ingress", packet(4, "udp", CLIENT, VIP, 5353, 80))
        assert sorted(f.kind for f in dp.conntrack()) == ["reply", "service"]
        time.sleep(0.3)  # expired; no packet has met the entries since
        assert dp.conntrack() == []
        dead = dp.conntrack(include_dead=True)
        assert sorted(f.kind for f in dead) == ["reply", "service"]
        assert [f.expires_in for f in dead if f.kind == "service"] == [0.0]
        assert dp.flows() == [] and len(dp.flows(include_dead=True)) == 2


@pytest.mark.parametrize("family", [4, 6])
def test_a_backend_calling_its_own_service_is_answered_through_the_hairpin_address(
    dp: lb.Datapath, family: int
) -> None:
    backend, vip = ("10.0.1.1", VIP) if family == 4 else ("fd00:2::1", "fd00:96::10")
    hairpin = str(dp.hairpin_addresses[0 if family == 4 else 1])
    ip = IP if family == 4 else IPv6
    dp.upsert(lb.Service(vip, 80, name="default/self", backends=[lb.Backend(backend, 8080)]))
    call = packet(family, "tcp", backend, vip, 40000, 80, payload=b"", flags="S")
    verdict, out = run(dp, "lb_ingress", call)
    # To itself, from the hairpin address: its kernel would drop its own source.
    assert verdict == TC_ACT_OK
    assert (out[ip].src, out[ip].dst, out[TCP].dport) == (hairpin, backend, 8080)
    assert bad_checksums(out) == []
    answer = packet(family, "tcp", backend, hairpin, 8080, 40000, payload=b"", flags="SA")
    verdict, back = run(dp, "lb_ingress", answer)  # it answers the hairpin address
    assert verdict == TC_ACT_OK
    assert (back[ip].src, back[TCP].sport, back[ip].dst, back[TCP].dport) == (
        vip,
        80,
        backend,
        40000,
    )
    assert bad_checksums(back) == []
    (flow,) = [f for f in dp.conntrack() if f.kind == "service"]
    assert flow.backend == (f"{backend}:8080" if family == 4 else f"[{backend}]:8080")
    assert kinds_in(dp, maps.CT) == [0, 1]  # answered: on to the established table
    assert dp.stats(dp.services[0]).replies.packets == 1


def test_a_packet_to_the_hairpin_address_of_no_flow_is_left_alone(dp: lb.Datapath) -> None:
    dp.upsert(web())
    stray = packet(4, "tcp", BACKEND, "169.254.42.1", 8080, 40001, payload=b"", flags="SA")
    verdict, out = run(dp, "lb_ingress", stray)
    assert verdict == TC_ACT_OK and bytes(out) == bytes(stray)


def test_hairpin_addresses_are_checked() -> None:
    with pytest.raises(ValueError, match=r"hairpin_addresses must be .*got \('10.0.0.1',\)"):
        lb.Datapath("hairpin-bad", hairpin_addresses=("10.0.0.1",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fe80::1"):
        lb.Datapath("hairpin-bad", hairpin_addresses=("169.254.42.1", "fe80::1"))


def kinds_in(dp: lb.Datapath, table: str) -> list[int]:
    return sorted(int(key.dir) for key in dp._object.map(table))


def test_a_tcp_flow_moves_to_the_established_table_when_the_backend_answers(
    dp: lb.Datapath,
) -> None:
    dp.sync([web(), web(OTHER_VIP, "default/dns", protocol="udp")])
    run(dp, "lb_ingress", to_vip("S"))
    assert kinds_in(dp, maps.CT_SYN) == [0, 1] and kinds_in(dp, maps.CT) == []
    run(dp, "lb_egress", from_backend("SA"))
    assert kinds_in(dp, maps.CT_SYN) == [] and kinds_in(dp, maps.CT) == [0, 1]
    assert dp.conntrack_stats()[1].confirmed == 1
    assert run(dp, "lb_ingress", to_vip("A"))[1][IP].dst == BACKEND  # found there
    assert run(dp, "lb_egress", from_backend("A"))[1][IP].src == VIP
    run(dp, "lb_ingress", packet(4, "udp", CLIENT, OTHER_VIP, 5353, 80))
    assert kinds_in(dp, maps.CT_UDP) == [0, 1]


def test_a_syn_flood_churns_only_the_table_of_unanswered_flows() -> None:
    with datapath("synflood", max_conntrack_syn=64, max_conntrack=64) as dp:
        dp.upsert(web())
        run(dp, "lb_ingress", to_vip("S"))
        run(dp, "lb_egress", from_backend("SA"))  # established
        for port in range(20000, 20000 + 100 * 64):  # spoofed SYNs: never answered
            run(
                dp,
                "lb_ingress",
                packet(4, "tcp", "10.7.0.1", VIP, port, 80, payload=b"", flags="S"),
            )
        assert kinds_in(dp, maps.CT) == [0, 1]  # untouched
        assert len(kinds_in(dp, maps.CT_SYN)) <= 64
        # Moved off the flow's backend now, a lost entry would be balanced anew.
        dp.upsert(
            web().with_backends(
                [lb.Backend(BACKEND, 8080, state="terminating"), lb.Backend("10.0.1.2", 8080)]
            )
        )
        assert run(dp, "lb_ingress", to_vip("A"))[1][IP].dst == BACKEND


def table(dp: lb.Datapath, name: str) -> lb.ConntrackTable:
    (found,) = [t for t in dp.conntrack_stats() if t.table == name]
    return found


def test_the_collector_deletes_expired_flows_and_counts_them() -> None:
    with datapath("gc", ct_timeouts=lb.ConntrackTimeouts(udp=0.2), ct_gc_interval=None) as dp:
        dp.sync([web(), web(OTHER_VIP, "default/dns", protocol="udp")])
        for port in (5001, 5002, 5003):
            run(dp, "lb_ingress", packet(4, "udp", CLIENT, OTHER_VIP, port, 80))
        run(dp, "lb_ingress", to_vip("S"))  # TCP, unanswered: 60 s to go
        assert (table(dp, "udp").entries, table(dp, "udp").created) == (6, 3)
        time.sleep(0.3)  # past the UDP timeout; no packet meets the entries
        assert dp.collect_garbage() == 6
        udp, syn = table(dp, "udp"), table(dp, "tcp_syn")
        assert (udp.entries, udp.collected) == (0, 6)
        assert (syn.entries, syn.created, syn.collected) == (2, 1, 0)
        assert dp.collect_garbage() == 0


def test_the_background_collector_runs_on_its_own() -> None:
    timeouts = lb.ConntrackTimeouts(udp=0.2)
    with datapath("gc-bg", ct_timeouts=timeouts, ct_gc_interval=0.2) as dp:
        dp.upsert(web(OTHER_VIP, "default/dns", protocol="udp"))
        run(dp, "lb_ingress", packet(4, "udp", CLIENT, OTHER_VIP, 5001, 80))
        deadline = time.monotonic() + 10.0
        while table(dp, "udp").collected < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert table(dp, "udp").collected == 2 and table(dp, "udp").entries == 0


def test_evicted_halves_are_counted(dp: lb.Datapath) -> None:
    dp.upsert(web())
    run(dp, "lb_ingress", to_vip("S"))
    ct = dp._object.map(maps.CT_SYN)
    (service_key,) = [k for k in ct if int(k.dir) == 0]
    ct.delete(service_key)  # as the LRU would
    run(dp, "lb_egress", from_backend("SA"))
    assert table(dp, "tcp_syn").orphaned == 1
    assert table(dp, "tcp_syn").confirmed == 0  # an orphan confirms nothing


def test_ct_gc_interval_is_checked() -> None:
    with pytest.raises(ValueError, match=r"ct_gc_interval must be None or seconds .* got 0"):
        lb.Datapath("gc-bad", ct_gc_interval=0)


def test_a_udp_datagram_straight_to_the_backend_takes_the_tuple_over(dp: lb.Datapath) -> None:
    dp.upsert(web(protocol="udp"))
    to_service = packet(4, "udp", CLIENT, VIP, 5353, 80)
    answer = packet(4, "udp", BACKEND, CLIENT, 8080, 5353, payload=b"answer")
    run(dp, "lb_ingress", to_service)
    assert run(dp, "lb_egress", answer)[1][IP].src == VIP
    direct = packet(4, "udp", CLIENT, BACKEND, 5353, 8080)
    assert bytes(run(dp, "lb_ingress", direct)[1]) == bytes(direct)
    assert bytes(run(dp, "lb_egress", answer)[1]) == bytes(answer)  # from whom it asked
    assert dp.conntrack() == []  # the VIP flow gave its tuple up, both halves
    run(dp, "lb_ingress", to_service)  # and the VIP again
    assert run(dp, "lb_egress", answer)[1][IP].src == VIP


def test_a_removed_backends_counters_stay_readable_until_its_last_flow_ends(
    dp: lb.Datapath,
) -> None:
    svc = three()
    dp.upsert(svc)
    first = run(dp, "lb_ingress", to_vip("S"))[1][IP].dst
    for _ in range(2):
        run(dp, "lb_ingress", to_vip("A"))
    gone = [b for b in svc.backends if str(b.address) == first]
    dp.upsert(svc.with_backends([b for b in svc.backends if str(b.address) != first]))
    assert {b: t.packets for b, t in dp.stats(svc).removed_backends.items()} == {gone[0]: 3}
    assert dp.collect_garbage() == 0  # its flow lives: the counters stay
    assert len(dp.stats(svc).removed_backends) == 1
    run(dp, "lb_ingress", to_vip("A"))  # the flow's next segment: reset, the flow ends
    dp.collect_garbage()
    assert dp.stats(svc).removed_backends == {}
    assert len(list(dp._object.map(maps.BE_GONE))) == 0


def test_the_collector_thread_does_not_keep_a_forgotten_datapath_alive() -> None:
    name = f"t{os.getpid()}-forgotten"
    forgotten = lb.Datapath(name, pin_root=PIN_ROOT, ct_gc_interval=0.1)
    forgotten.upsert(web())  # it holds something: pinned
    ref, thread = weakref.ref(forgotten), forgotten._gc_thread
    assert thread is not None and thread.is_alive()
    with pytest.warns(ResourceWarning, match="unclosed"):
        del forgotten
        gc.collect()
    assert ref() is None
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    lb.Datapath(name, pin_root=PIN_ROOT, create=False).destroy()  # adopted through its pins
