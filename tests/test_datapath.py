"""The Datapath API: programming services, reading them back, bad input, capacity, pins."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import PIN_ROOT
from lbtest import TC_ACT_OK, datapath, packet, run, service
from namespaces import VethPair
from scapy.layers.inet import IP, TCP

import pyebpflb as lb
from pyebpflb._bpf import Map, MapType, tc
from pyebpflb._bpf.netns import current_id, entered
from pyebpflb.datapath import apply, lock

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel


def test_services_read_back_equal_what_was_synced() -> None:
    wanted = [service(4, "tcp"), service(4, "udp", port=53), service(6, "tcp", name="v6")]
    with datapath("readback") as dp:
        dp.sync(wanted)
        assert dp.services == wanted
        assert repr(dp).endswith("3 services>")


def test_sync_removes_what_is_not_listed_and_upsert_replaces() -> None:
    with datapath("sync") as dp:
        dp.sync([service(4, "tcp"), service(4, "udp", port=53)])
        dp.sync([service(4, "udp", port=53)])
        assert dp.services == [service(4, "udp", port=53)]
        renamed = service(4, "udp", port=53, name="kube-system/dns", count=1)
        dp.upsert(renamed, replace=True)  # another name: replacing is said
        assert dp.services == [renamed]
        assert dp.remove(renamed) is True
        assert dp.remove(renamed) is False
        assert dp.services == []


def test_a_service_without_backends_is_installed_and_read_back() -> None:
    with datapath("empty") as dp:
        dp.upsert(service(4, "tcp", count=0))
        assert dp.services == [service(4, "tcp", count=0)]


def test_changing_backends_many_times_leaves_no_stale_slots() -> None:
    with datapath("churn") as dp:
        for count in (3, 1, 3, 0, 2, 3, 1):
            dp.upsert(service(4, "tcp", count=count))
            assert dp.services == [service(4, "tcp", count=count)]
        slots = dp._object.map("lb_slots")
        # At most the current generation (1 slot) and the previous one (3).
        assert len(slots) <= 4


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: service(4, "tcp", count=3), "has 3 backends; this datapath allows 2 per service"),
        (lambda: "not a service", "expected a Service, got 'not a service'"),
    ],
)
def test_bad_input_raises_valueerror_and_writes_nothing(make: object, message: str) -> None:
    with datapath("bad", max_backends_per_service=2) as dp:
        dp.sync([service(4, "udp", port=53, count=1)])
        before = dp.services
        with pytest.raises(ValueError, match=message):
            dp.upsert(make())  # type: ignore[operator]
        with pytest.raises(ValueError, match=message):
            dp.sync([service(4, "udp", port=53, count=1), make()])  # type: ignore[operator]
        assert dp.services == before


def test_sync_with_two_services_on_one_vip_port_and_protocol_is_refused() -> None:
    with datapath("dupe") as dp, pytest.raises(ValueError, match="have the same vip, port and"):
        dp.sync([service(4, "tcp", name="a"), service(4, "tcp", name="b")])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "datapath name must be 1 to 63 bytes"),
        ({"name": "a/b"}, "without '/', got 'a/b'"),
        ({"max_services": 0}, "max_services must be an integer from 1 to 16777216, got 0"),
        ({"max_conntrack": "lots"}, "max_conntrack must be an integer from 16 to"),
        ({"ct_timeouts": 5}, "ct_timeouts must be a ConntrackTimeouts, got 5"),
    ],
)
def test_bad_datapath_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    args = {"name": "x", "pin_root": PIN_ROOT, **kwargs}
    with pytest.raises(ValueError, match=message):
        lb.Datapath(**args)  # type: ignore[arg-type]
    assert not PIN_ROOT.exists() or not any(PIN_ROOT.iterdir())


def test_negative_timeout_is_named() -> None:
    with pytest.raises(ValueError, match="conntrack timeout udp must be > 0 seconds, got -1"):
        lb.ConntrackTimeouts(udp=-1)


def entry_counts(dp: lb.Datapath) -> dict[str, int]:
    names = ("lb_services", "lb_slots", "lb_backends", "lb_svc_names", "lb_vips")
    return {name: len(dp._object.map(name)) for name in names}


def test_overflowing_the_services_map_keeps_the_previous_services_serving() -> None:
    first = [service(4, "tcp", port=p) for p in (80, 81, 82)]
    with datapath("full-services", max_services=4) as dp:
        dp.sync(first)
        before = entry_counts(dp)
        more = [service(4, "tcp", port=p) for p in (80, 83, 84, 85, 86)]
        with pytest.raises(lb.MapFull, match="raise max_services"):
            dp.sync(more)
        assert dp.services == first
        assert entry_counts(dp) == before  # nothing half-written left behind
        verdict, out = run(dp, "lb_ingress", packet(4, "tcp", "10.1.0.5", "10.96.0.10", 1000, 82))
        assert verdict == TC_ACT_OK and out[IP].dst.startswith("10.0.1.")
        # 84 was never published: a port none of the VIP's services has, refused with
        # a reset (and an address with no service at all passes untouched).
        refused = run(dp, "lb_ingress", packet(4, "tcp", "10.1.0.5", "10.96.0.10", 1000, 84))[1]
        assert refused[TCP].flags.R and refused[IP].dst == "10.1.0.5"
        sent = packet(4, "tcp", "10.1.0.5", "10.96.0.11", 1000, 84)
        assert bytes(run(dp, "lb_ingress", sent)[1]) == bytes(sent)


def test_overflowing_the_backends_map_keeps_the_previous_services() -> None:
    with datapath("full-backends", max_backends=4) as dp:
        dp.sync([service(4, "tcp", count=3)])
        before = entry_counts(dp)
        with pytest.raises(lb.MapFull, match="raise max_backends"):
            dp.sync([service(4, "tcp", count=3), service(4, "udp", count=3)])
        assert dp.services == [service(4, "tcp", count=3)]
        assert entry_counts(dp) == before


def many(count: int, port: int = 80, backends: int = 3) -> list[lb.Service]:
    return [
        lb.Service(
            vip=f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",
            port=port,
            name=f"default/s{i}",
            backends=[
                lb.Backend(f"10.200.{i // 256 % 256}.{i % 256}", 8080 + b) for b in range(backends)
            ],
        )
        for i in range(count)
    ]


def test_a_large_sync_written_in_chunks_replaces_the_installed_set() -> None:
    # 30,000 services are planned and written in chunks (apply.CHUNK_SERVICES),
    # the kernel writing one while the next is planned; removals and changes of
    # installed services go with them.
    assert apply.OVERLAP_FROM <= 30_000
    installed = many(200, port=81) + many(100)
    with datapath("chunks", max_services=40_000, max_backends=100_000) as dp:
        dp.sync(installed)
        wanted = many(30_000, backends=2)  # the 100 on port 80 lose a backend
        dp.sync(wanted)
        assert sorted(dp.services, key=lambda s: s.name) == sorted(wanted, key=lambda s: s.name)
        counts = entry_counts(dp)
        assert (counts["lb_services"], counts["lb_backends"], counts["lb_svc_names"]) == (
            30_000,
            60_000,
            30_000,
        )
        for svc in (wanted[0], wanted[-1]):
            _, out = run(dp, "lb_ingress", packet(4, "tcp", "10.1.0.5", str(svc.vip), 1000, 80))
            assert out[IP].dst == str(svc.backends[0].address)  # all of one address
        assert counts["lb_vips"] == 30_000  # one per service address
        # Port 81 went, port 80 of the address stayed: 81 is refused now (a reset).
        removed = packet(4, "tcp", "10.1.0.5", str(installed[0].vip), 1000, 81)
        assert run(dp, "lb_ingress", removed)[1][TCP].flags.R


def test_a_large_sync_failing_in_a_later_chunk_undoes_the_earlier_chunks() -> None:
    installed = many(10, port=81)
    with datapath("chunks-full", max_services=40_000, max_backends=40_000) as dp:
        dp.sync(installed)
        before = entry_counts(dp)
        # The second chunk overflows lb_backends; the first was written already.
        with pytest.raises(lb.MapFull, match="raise max_backends"):
            dp.sync(installed + many(30_000))
        assert dp.services == installed
        assert entry_counts(dp) == before
        first = many(30_000)[-1]
        sent = packet(4, "tcp", "10.1.0.5", str(first.vip), 1000, 80)
        assert bytes(run(dp, "lb_ingress", sent)[1]) == bytes(sent)  # unpublished again
        # Port 80 of an installed address was unpublished too: refused, as unallocated.
        again = packet(4, "tcp", "10.1.0.5", str(installed[0].vip), 1000, 80)
        assert run(dp, "lb_ingress", again)[1][TCP].flags.R
        kept = packet(4, "tcp", "10.1.0.5", str(installed[3].vip), 1000, 81)
        assert run(dp, "lb_ingress", kept)[1][IP].dst == str(installed[3].backends[0].address)


def test_ten_thousand_services_with_three_backends_sync_and_serve() -> None:
    wanted = [
        lb.Service(
            vip=f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",
            port=80,
            backends=[lb.Backend(f"10.200.{i // 256 % 256}.{i % 256}", 8080 + b) for b in range(3)],
        )
        for i in range(10_000)
    ]
    with datapath("10k") as dp:
        started = time.monotonic()
        dp.sync(wanted)
        took = time.monotonic() - started
        print(f"sync of 10,000 services x 3 backends: {took:.2f} s")
        assert len(dp.services) == 10_000
        last = wanted[-1]
        _, out = run(dp, "lb_ingress", packet(4, "tcp", "10.1.0.5", str(last.vip), 1000, 80))
        assert out[IP].dst == "10.200.39.15"
        dp.sync([])
        assert dp.services == []
        assert len(dp._object.map("lb_backends")) == 0


def test_maps_are_pinned_under_pin_root_and_name_once_it_holds_something() -> None:
    with datapath("pins") as dp:
        assert not os.path.exists(dp.pin_dir)  # nothing to keep yet
        dp.upsert(service(4, "tcp"))
        pins = sorted(os.listdir(dp.pin_dir))
        assert dp.pin_dir == str(PIN_ROOT / dp.name)
        assert pins == sorted(dp._object.maps)
    assert not (PIN_ROOT / dp.name).exists()


def test_persisted_datapath_is_adopted_by_a_new_one(pin_dir: pathlib.Path) -> None:
    name = f"t{os.getpid()}-persist"
    svc = service(4, "tcp")
    with lb.Datapath(name, persist=True, pin_root=pin_dir) as first:
        first.upsert(svc)
        _, out = run(first, "lb_ingress", packet(4, "tcp", "10.1.0.5", "10.96.0.10", 1234, 80))
        backend = out[IP].dst
    assert os.listdir(pin_dir / name)  # still pinned
    with lb.Datapath(name, persist=True, pin_root=pin_dir) as second:
        assert second.adopted
        assert second.services == [svc]
        _, again = run(second, "lb_ingress", packet(4, "tcp", "10.1.0.5", "10.96.0.10", 1234, 80))
        assert again[IP].dst == backend  # the flow survived in the adopted conntrack
        second.destroy()
    assert not (pin_dir / name).exists()


def test_a_datapath_of_another_layout_is_refused_naming_each_difference(
    pin_dir: pathlib.Path,
) -> None:
    name = f"t{os.getpid()}-layout"
    svc = service(4, "tcp")
    with lb.Datapath(name, persist=True, pin_root=pin_dir) as first:
        first.upsert(svc)
    folder = pin_dir / name
    # Another version's lb_svc_names: 64-byte names instead of 256, and one map this
    # version does not know.
    (folder / "lb_svc_names").unlink()
    no_prealloc = 1  # BPF_F_NO_PREALLOC, as the real one has
    with Map.create(
        MapType.HASH, key_size=4, value_size=64, max_entries=16, flags=no_prealloc
    ) as other:
        other.pin(folder / "lb_svc_names")
    with Map.create(MapType.ARRAY, key_size=4, value_size=4, max_entries=1) as extra:
        extra.pin(folder / "lb_future")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(lb.IncompatibleDatapath) as info:
        lb.Datapath(name, persist=True, pin_root=pin_dir)
    assert info.value.differences == [
        "lb_future: not a map of this version",
        "lb_svc_names: value_size 64, this version needs 256",
    ]
    assert "destroy it first (pyebpflb --datapath" in str(info.value)
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing was changed
    for pin in folder.iterdir():
        pin.unlink()
    folder.rmdir()
    os.unlink(lock.path_for(name, current_id()))  # the first one's writer lock


def test_attach_is_idempotent_and_close_detaches(veth: VethPair) -> None:
    host = veth.right
    with datapath("attach", netns=host.netns) as dp:
        dp.attach(host.iface)
        dp.attach(host.iface)
        assert dp.interfaces == [host.iface]
        with entered(host.netns):
            assert tc.query(host.iface, "ingress", handle=0xEB1B) is not None
    with entered(host.netns):
        assert tc.query(host.iface, "ingress", handle=0xEB1B) is None
        assert tc.query(host.iface, "egress", handle=0xEB1B) is None


def test_attach_refuses_an_interface_that_runs_another_datapath(veth: VethPair) -> None:
    host = veth.right
    with datapath("one", netns=host.netns) as one, datapath("two", netns=host.netns) as two:
        one.attach(host.iface)
        with pytest.raises(
            lb.PyEbpfLbError, match=rf"already runs another pyebpflb datapath '{one.name}'"
        ):
            two.attach(host.iface)
        three = lb.Datapath(
            f"t{os.getpid()}-three", persist=True, pin_root=PIN_ROOT, netns=host.netns
        )
        with pytest.raises(lb.PyEbpfLbError, match="already runs another"):
            three.attach(host.iface)
        three.close()
        assert not (PIN_ROOT / three.name).exists()  # a failed start leaves no pins
        assert one.interfaces == [host.iface] and two.interfaces == []
        with pytest.raises(lb.NotFound, match=r"not attached there; it runs on no interface"):
            two.detach(host.iface)
        with pytest.raises(lb.NotFound, match=r"lo: .*not attached there; it runs on veth-r"):
            one.detach("lo")
        assert one.interfaces == [host.iface]  # nothing changed


def test_same_name_in_two_namespaces_are_two_datapaths(veth: VethPair) -> None:
    left, right = veth.left, veth.right
    with datapath("twin", netns=left.netns) as a, datapath("twin", netns=right.netns) as b:
        assert a.pin_dir != b.pin_dir
        a.upsert(service(4, "tcp"))
        assert b.services == []
        assert a.services == [service(4, "tcp")]


ADOPT_UNDER_IP_NETNS_EXEC = textwrap.dedent(
    """
    import sys
    import pyebpflb as lb
    dp = lb.Datapath(sys.argv[1], persist=True, pin_root=sys.argv[2])
    print(dp.adopted, [s.name for s in dp.services], dp.interfaces)
    dp.upsert(lb.Service(vip="10.96.0.99", port=99, name="added-by-the-second"))
    dp.close()
    """
)


def test_datapath_is_adopted_under_ip_netns_exec_without_a_shared_bpffs(veth: VethPair) -> None:
    host = veth.right
    name = f"t{os.getpid()}-netns-exec"
    with lb.Datapath(name, persist=True, pin_root=PIN_ROOT, netns=host.netns) as first:
        first.attach(host.iface)
        first.upsert(service(4, "tcp", name="first"))
    # `ip netns exec` mounts a fresh /sys: the pins above are not visible there.
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            host.netns,
            sys.executable,
            "-c",
            ADOPT_UNDER_IP_NETNS_EXEC,
            name,
            str(PIN_ROOT),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split("\n")[0] == f"True ['first'] ['{host.iface}']"
    with lb.Datapath(name, pin_root=PIN_ROOT, netns=host.netns) as again:
        assert [s.name for s in again.services] == ["first", "added-by-the-second"]
        again.destroy()  # adopted: closing alone would leave it running
    with entered(host.netns):
        assert tc.query(host.iface, "ingress", handle=0xEB1B) is None


def test_flush_conntrack_forgets_every_flow() -> None:
    with datapath("flush") as dp:
        dp.upsert(service(4, "udp"))
        for port in (5000, 5001, 5002):
            run(dp, "lb_ingress", packet(4, "udp", "10.1.0.5", "10.96.0.10", port, 80))
        flows = dp.conntrack()
        assert len(flows) == 6  # a SERVICE and a REPLY entry per flow
        assert sorted({f.kind for f in flows}) == ["reply", "service"]
        assert dp.flush_conntrack() == 6
        assert dp.conntrack() == []


def test_detach_removes_the_datapath_from_one_interface(veth: VethPair) -> None:
    with (
        datapath("detach", netns=veth.left.netns) as left,
        datapath("detach-r", netns=veth.right.netns) as right,
    ):
        left.attach(veth.left.iface)
        right.attach(veth.right.iface)
        left.detach(veth.left.iface)
        assert left.interfaces == [] and right.interfaces == [veth.right.iface]


def test_a_closed_datapath_refuses_to_work() -> None:
    with datapath("closed") as dp:
        pass
    for use in (lambda: dp.upsert(service(4, "tcp")), lambda: dp.services, dp.stats, dp.flows):
        with pytest.raises(lb.DatapathClosed, match=r"datapath '.*closed' is closed"):
            use()
