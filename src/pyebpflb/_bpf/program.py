"""Loaded BPF programs: identity and BPF_PROG_TEST_RUN."""

from __future__ import annotations

import enum
import os
from typing import Any, NamedTuple

from pyebpflb._bpf import fs
from pyebpflb._bpf._call import check, object_info
from pyebpflb._bpf._libbpf import ffi, lib


class ProgramType(enum.IntEnum):
    SCHED_CLS = lib.BPF_PROG_TYPE_SCHED_CLS
    XDP = lib.BPF_PROG_TYPE_XDP
    CGROUP_SKB = lib.BPF_PROG_TYPE_CGROUP_SKB


_CTX_OUT_MAX = 1024
# BPF_F_TEST_SKB_CHECKSUM_COMPLETE (Linux 6.17): the packet comes in as a NIC's
# CHECKSUM_COMPLETE, and the run fails with EBADMSG when skb->csum no longer
# matches its bytes afterwards.
TEST_SKB_CHECKSUM_COMPLETE = 1 << 2


class TestRun(NamedTuple):
    """Result of one BPF_PROG_TEST_RUN."""

    retval: int
    """What the program returned (an ``int``; tc's TC_ACT_UNSPEC is -1)."""
    data: bytes
    """The packet as the program left it."""
    duration_ns: int
    """Mean run time per repetition, as measured by the kernel."""
    ctx: bytes = b""
    """The context (``struct __sk_buff`` for tc) as the program left it, when one was given."""


class Program:
    """A program of a loaded :class:`~pyebpflb._bpf.Object`; the object owns its fd."""

    def __init__(
        self, fd: int, name: str, section: str, prog_type: int, handle: Any = None
    ) -> None:
        self.fd = fd
        # libbpf's struct bpf_program, for attach calls that create bpf_links.
        self._handle = handle
        self._owns_fd = False
        self.name = name
        self.section = section
        self.type = prog_type

    @classmethod
    def from_id(cls, prog_id: int) -> Program:
        """Open a loaded program by its kernel id; the result owns its fd (close it)."""
        fd = check(lib.bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")
        try:
            info = object_info(fd, "struct bpf_prog_info", f"read info of program {prog_id}")
        except BaseException:
            os.close(fd)
            raise
        program = cls(fd, ffi.string(info.name).decode(), "", int(info.type))
        program._owns_fd = True
        return program

    def map_ids(self) -> list[int]:
        """Ids of the maps this program uses."""
        what = f"read maps of {self.name}"
        # First how many, then the ids into a buffer of that size.
        count = int(object_info(self.fd, "struct bpf_prog_info", what).nr_map_ids)
        ids = ffi.new("__u32[]", max(count, 1))
        request = ffi.new("struct bpf_prog_info *")
        request.nr_map_ids = count
        request.map_ids = int(ffi.cast("uintptr_t", ids))
        info = object_info(self.fd, "struct bpf_prog_info", what, request)
        return [int(ids[i]) for i in range(min(count, int(info.nr_map_ids)))]

    def close(self) -> None:
        """Close the fd if this object owns it (see :meth:`from_id`)."""
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def id(self) -> int:
        """The kernel's id of this program (as in ``bpftool prog``)."""
        return fs.object_id(self.fd)

    def test_run(
        self,
        data: bytes,
        *,
        repeat: int = 1,
        ctx: bytes | None = None,
        headroom: int = 512,
        flags: int = 0,
    ) -> TestRun:
        """Run the program on ``data`` in the kernel without any interface.

        ``repeat`` runs it that many times (the duration is the mean).
        ``headroom`` is how many bytes the program may grow the packet by.
        ``ctx`` is the program's context (for tc, a ``struct __sk_buff``'s first
        bytes); the result carries it back as the program left it. ``flags``
        are BPF_F_TEST_* bits (e.g. :data:`TEST_SKB_CHECKSUM_COMPLETE`).
        """
        if repeat < 1:
            raise ValueError(f"repeat must be at least 1, got {repeat}")
        if len(data) == 0:
            raise ValueError("test_run needs a packet of at least one byte")
        data_in = ffi.from_buffer(data)
        data_out = ffi.new("char[]", len(data) + headroom)
        opts = ffi.new("struct bpf_test_run_opts *")
        opts.sz = ffi.sizeof("struct bpf_test_run_opts")
        opts.data_in = data_in
        opts.data_size_in = len(data)
        opts.data_out = data_out
        opts.data_size_out = len(data) + headroom
        opts.repeat = repeat
        opts.flags = flags
        ctx_in: Any = None
        ctx_out: Any = None
        if ctx is not None:
            ctx_in = ffi.from_buffer(ctx)
            opts.ctx_in = ctx_in
            opts.ctx_size_in = len(ctx)
            # The kernel copies its whole context back, and fails with ENOSPC
            # when the buffer is smaller (struct __sk_buff is under 256 bytes).
            ctx_out = ffi.new("char[]", max(len(ctx), _CTX_OUT_MAX))
            opts.ctx_out = ctx_out
            opts.ctx_size_out = len(ctx_out)
        check(lib.bpf_prog_test_run_opts(self.fd, opts), f"test run of program {self.name}")
        retval = int(ffi.cast("int", opts.retval))
        out = bytes(ffi.buffer(data_out, opts.data_size_out))
        context = bytes(ffi.buffer(ctx_out, opts.ctx_size_out)) if ctx is not None else b""
        return TestRun(retval=retval, data=out, duration_ns=int(opts.duration), ctx=context)

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the program on a bpffs at ``path``, so it outlives this process."""
        fs.pin(self.fd, path, f"program {self.name}")

    def unpin(self, path: str | os.PathLike[str]) -> None:
        """Remove this program's pin at ``path``."""
        fs.unpin(self.fd, path, f"program {self.name}")

    def __repr__(self) -> str:
        return f"<Program {self.name!r} section={self.section!r} fd={self.fd}>"
