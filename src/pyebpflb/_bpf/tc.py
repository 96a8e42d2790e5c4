"""tc clsact attachment through netlink (libbpf's bpf_tc_* API).

A filter is identified by (interface, direction, handle, priority). Attaching
uses the replace flag at a fixed handle and priority, so attaching the same
program twice leaves one filter, and re-attaching a new build swaps it in
atomically. Detaching removes only that filter; the clsact qdisc is removed
only when this link created it and no filter of anybody's is left on it.
"""

from __future__ import annotations

import errno
from typing import Any

from pyebpflb._bpf import log
from pyebpflb._bpf._call import check
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb._bpf.link import Link
from pyebpflb._bpf.netlink import TC_H_EGRESS, TC_H_INGRESS, count_filters, ifindex_of
from pyebpflb._bpf.program import Program
from pyebpflb.model import Direction  # the model is a leaf: it imports nothing of ours

DEFAULT_HANDLE = 0xEB1B
DEFAULT_PRIORITY = 1


def _direction(value: Direction | str) -> Direction:
    try:
        return Direction(value)
    except ValueError:
        raise ValueError(f"tc direction must be 'ingress' or 'egress', got {value!r}") from None


def _hook(ifindex: int, direction: Direction) -> Any:
    hook = ffi.new("struct bpf_tc_hook *")
    hook.sz = ffi.sizeof("struct bpf_tc_hook")
    hook.ifindex = ifindex
    hook.attach_point = lib.BPF_TC_INGRESS if direction is Direction.INGRESS else lib.BPF_TC_EGRESS
    return hook


def _opts(handle: int, priority: int) -> Any:
    opts = ffi.new("struct bpf_tc_opts *")
    opts.sz = ffi.sizeof("struct bpf_tc_opts")
    opts.handle = handle
    opts.priority = priority
    return opts


def query(
    iface: str | int,
    direction: Direction | str,
    *,
    handle: int = DEFAULT_HANDLE,
    priority: int = DEFAULT_PRIORITY,
) -> int | None:
    """The id of the program in the filter at (handle, priority), or ``None``."""
    ifindex = ifindex_of(iface)
    opts = _opts(handle, priority)
    # "No such filter" is an answer here, not a problem worth a warning.
    with log.capture(silent=True):
        ret = lib.bpf_tc_query(_hook(ifindex, _direction(direction)), opts)
    if ret in (-errno.ENOENT, -errno.EINVAL):
        return None  # no such filter, or no clsact qdisc at all
    check(ret, f"query tc filter on ifindex {ifindex}")
    return int(opts.prog_id)


class TcLink(Link):
    """One of our tc filters: a program on an interface's ingress or egress."""

    def __init__(
        self,
        ifindex: int,
        direction: Direction,
        handle: int,
        priority: int,
        prog_id: int,
        created_qdisc: bool,
    ) -> None:
        self.ifindex = ifindex
        self.direction = direction
        self.handle = handle
        self.priority = priority
        self.prog_id = prog_id
        self.created_qdisc = created_qdisc
        self.attached = True

    @classmethod
    def attach(
        cls,
        program: Program,
        iface: str | int,
        direction: Direction | str = Direction.INGRESS,
        *,
        handle: int = DEFAULT_HANDLE,
        priority: int = DEFAULT_PRIORITY,
    ) -> TcLink:
        """Attach ``program`` (direct-action) to ``iface``; idempotent."""
        where = _direction(direction)
        if not 0 < handle < 2**32:
            raise ValueError(f"tc handle must be in 1..0xffffffff, got {handle}")
        if not 0 < priority < 2**16:
            raise ValueError(f"tc priority must be in 1..65535, got {priority}")
        ifindex = ifindex_of(iface)
        hook = _hook(ifindex, where)
        with log.capture(silent=True) as said:
            ret = lib.bpf_tc_hook_create(hook)
        if ret != -errno.EEXIST:  # a clsact qdisc is there already: share it
            for line in said:
                log.logger.warning("libbpf: %s", line.rstrip())
            check(ret, f"create clsact qdisc on ifindex {ifindex}")
        created = ret == 0
        opts = _opts(handle, priority)
        opts.prog_fd = program.fd
        opts.flags = lib.BPF_TC_F_REPLACE
        try:
            check(
                lib.bpf_tc_attach(hook, opts),
                f"attach {program.name} to tc {where.value} of ifindex {ifindex}",
            )
        except BaseException:
            if created:
                _destroy_hook_if_empty(ifindex)
            raise
        return cls(ifindex, where, handle, priority, int(opts.prog_id), created)

    def detach(self) -> None:
        """Remove our filter; the clsact qdisc goes only if we made it and it is empty."""
        if not self.attached:
            return
        hook = _hook(self.ifindex, self.direction)
        ret = lib.bpf_tc_detach(hook, _opts(self.handle, self.priority))
        # ENOENT: already gone (interface deleted, or detached elsewhere).
        if ret not in (-errno.ENOENT, -errno.ENODEV, -errno.EINVAL):
            check(ret, f"detach tc {self.direction.value} filter from ifindex {self.ifindex}")
        self.attached = False
        if self.created_qdisc:
            _destroy_hook_if_empty(self.ifindex)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (
            f"<TcLink ifindex={self.ifindex} {self.direction.value} handle={self.handle:#x} "
            f"priority={self.priority} prog_id={self.prog_id} {state}>"
        )


def _destroy_hook_if_empty(ifindex: int) -> None:
    if count_filters(ifindex, TC_H_INGRESS) or count_filters(ifindex, TC_H_EGRESS):
        return
    hook = _hook(ifindex, Direction.INGRESS)
    hook.attach_point = lib.BPF_TC_INGRESS | lib.BPF_TC_EGRESS  # the whole clsact qdisc
    ret = lib.bpf_tc_hook_destroy(hook)
    if ret not in (-errno.ENOENT, -errno.ENODEV, -errno.EINVAL):
        check(ret, f"remove clsact qdisc of ifindex {ifindex}")
