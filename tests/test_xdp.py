"""XDP attach and detach on a veth."""

from __future__ import annotations

import pytest
from namespaces import VethPair

from pyebpflb import objects
from pyebpflb._bpf import Object, XdpLink, netns, xdp
from pyebpflb.errors import BpfError

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel


def test_xdp_attach_detach_and_idempotent_reattach(veth: VethPair, counter: Object) -> None:
    prog = counter.program("count_xdp")
    host = veth.right
    with netns.entered(host.netns):
        link = XdpLink.attach(prog, host.iface)
        assert xdp.attached_id(host.iface) == prog.id
        again = XdpLink.attach(prog, host.iface)
        assert xdp.attached_id(host.iface) == prog.id
        again.detach()
        link.detach()
        assert xdp.attached_id(host.iface) is None


def test_xdp_never_replaces_another_program(veth: VethPair, counter: Object) -> None:
    host = veth.right
    with objects.open_object("counter").load() as other, netns.entered(host.netns):
        theirs = XdpLink.attach(other.program("count_xdp"), host.iface)
        try:
            with pytest.raises(BpfError, match=r"program id \d+ is attached there already"):
                XdpLink.attach(counter.program("count_xdp"), host.iface)
            assert xdp.attached_id(host.iface) == other.program("count_xdp").id
        finally:
            theirs.detach()


def test_generic_mode_attach(veth: VethPair, counter: Object) -> None:
    host = veth.left
    with (
        netns.entered(host.netns),
        XdpLink.attach(counter.program("count_xdp"), host.iface, "generic"),
    ):
        assert xdp.attached_id(host.iface) == counter.program("count_xdp").id
    with netns.entered(host.netns):
        assert xdp.attached_id(host.iface) is None


def test_bad_mode_lists_the_valid_ones(counter: Object) -> None:
    with pytest.raises(ValueError, match=r"\['auto', 'native', 'generic'\], got 'turbo'"):
        XdpLink.attach(counter.program("count_xdp"), "lo", "turbo")
