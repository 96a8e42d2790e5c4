"""tc clsact attach and detach on a veth in a network namespace."""

from __future__ import annotations

import subprocess

import pytest
from namespaces import VethPair

from pyebpflb._bpf import Object, TcLink, netns, tc
from pyebpflb._bpf.netlink import TC_H_EGRESS, TC_H_INGRESS, count_filters

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel


def filters(host_ns: str, iface: str, direction: str) -> list[str]:
    """What `tc filter show` prints, one line per filter (the user's view)."""
    out = subprocess.run(
        ["ip", "netns", "exec", host_ns, "tc", "filter", "show", "dev", iface, direction],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # tc prints a header line per priority slot; filters are the lines with a handle.
    return [line for line in out.splitlines() if line.startswith("filter") and " handle " in line]


def qdiscs(host_ns: str, iface: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", host_ns, "tc", "qdisc", "show", "dev", iface],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_attach_puts_our_program_on_ingress_and_detach_removes_it(
    veth: VethPair, counter: Object
) -> None:
    prog = counter.program("count_tc_ingress")
    host = veth.right
    with netns.entered(host.netns):
        link = TcLink.attach(prog, host.iface, "ingress")
        assert tc.query(host.iface, "ingress") == prog.id
    shown = filters(host.netns, host.iface, "ingress")
    assert len(shown) == 1 and "count_tc_ingres" in shown[0] and "direct-action" in shown[0]
    with netns.entered(host.netns):
        link.detach()
        assert tc.query(host.iface, "ingress") is None
    assert filters(host.netns, host.iface, "ingress") == []
    assert "clsact" not in qdiscs(host.netns, host.iface)


def test_attaching_twice_leaves_one_filter(veth: VethPair, counter: Object) -> None:
    prog = counter.program("count_tc_egress")
    host = veth.left
    with netns.entered(host.netns):
        first = TcLink.attach(prog, host.iface, "egress")
        second = TcLink.attach(prog, host.iface, "egress")
        assert count_filters(first.ifindex, TC_H_EGRESS) == 1
        assert first.prog_id == second.prog_id == prog.id
        second.detach()
        first.detach()
        assert count_filters(first.ifindex, TC_H_EGRESS) == 0


def test_reattach_at_the_same_handle_swaps_the_program(veth: VethPair, counter: Object) -> None:
    host = veth.left
    with netns.entered(host.netns):
        TcLink.attach(counter.program("count_tc_ingress"), host.iface, "ingress")
        link = TcLink.attach(counter.program("count_tc_egress"), host.iface, "ingress")
        assert tc.query(host.iface, "ingress") == counter.program("count_tc_egress").id
        assert count_filters(link.ifindex, TC_H_INGRESS) == 1
        link.detach()


def test_detach_keeps_a_foreign_filter_and_its_clsact_qdisc(
    veth: VethPair, counter: Object
) -> None:
    host = veth.right
    with netns.entered(host.netns):
        link = TcLink.attach(counter.program("count_tc_ingress"), host.iface, "ingress")
    assert link.created_qdisc
    # Somebody else's classic BPF filter (accept all) on the same hook.
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            host.netns,
            "tc",
            "filter",
            "add",
            "dev",
            host.iface,
            "ingress",
            "pref",
            "200",
            "bpf",
            "bytecode",
            "1,6 0 0 4294967295,",
        ],
        check=True,
    )
    assert len(filters(host.netns, host.iface, "ingress")) >= 2
    with netns.entered(host.netns):
        link.detach()
    left = filters(host.netns, host.iface, "ingress")
    assert left and all("count_tc" not in line for line in left)
    assert "pref 200 bpf" in left[0]
    assert "clsact" in qdiscs(host.netns, host.iface)


def test_a_clsact_qdisc_we_did_not_create_is_never_removed(veth: VethPair, counter: Object) -> None:
    host = veth.left
    subprocess.run(
        ["ip", "netns", "exec", host.netns, "tc", "qdisc", "add", "dev", host.iface, "clsact"],
        check=True,
    )
    with netns.entered(host.netns):
        link = TcLink.attach(counter.program("count_tc_ingress"), host.iface, "ingress")
        assert not link.created_qdisc
        link.detach()
    assert "clsact" in qdiscs(host.netns, host.iface)


def test_attach_to_missing_interface_names_it(counter: Object) -> None:
    with pytest.raises(ValueError, match="no interface named 'nope0'"):
        TcLink.attach(counter.program("count_tc_ingress"), "nope0")


def test_bad_direction_and_priority_are_refused(counter: Object) -> None:
    prog = counter.program("count_tc_ingress")
    with pytest.raises(ValueError, match="'ingress' or 'egress', got 'sideways'"):
        TcLink.attach(prog, "lo", "sideways")
    with pytest.raises(ValueError, match=r"priority must be in 1\.\.65535, got 0"):
        TcLink.attach(prog, "lo", priority=0)
