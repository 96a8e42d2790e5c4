"""XDP attachment through netlink.

Attaching never replaces somebody else's XDP program: the kernel is asked to
attach only if the hook is free, and attaching the program that is already
there is a no-op. Detaching removes the program only if it is still ours.
"""

from __future__ import annotations

import enum
import errno
from typing import Any

from pyebpflb._bpf._call import check
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb._bpf.link import Link
from pyebpflb._bpf.netlink import ifindex_of
from pyebpflb._bpf.program import Program
from pyebpflb.errors import BpfError


class XdpMode(enum.Enum):
    AUTO = "auto"  # native where the driver has it, else generic
    NATIVE = "native"
    GENERIC = "generic"

    @property
    def flags(self) -> int:
        if self is XdpMode.NATIVE:
            return int(lib.XDP_FLAGS_DRV_MODE)
        if self is XdpMode.GENERIC:
            return int(lib.XDP_FLAGS_SKB_MODE)
        return 0


def attached_id(iface: str | int, mode: XdpMode = XdpMode.AUTO) -> int | None:
    """The id of the XDP program on ``iface``, or ``None``."""
    prog_id = ffi.new("__u32 *")
    ifindex = ifindex_of(iface)
    check(lib.bpf_xdp_query_id(ifindex, mode.flags, prog_id), f"query XDP on ifindex {ifindex}")
    return int(prog_id[0]) or None


class XdpLink(Link):
    """Our XDP program on one interface."""

    def __init__(self, ifindex: int, program: Program, mode: XdpMode) -> None:
        self.ifindex = ifindex
        self.program = program
        self.mode = mode
        self.attached = True

    @classmethod
    def attach(
        cls, program: Program, iface: str | int, mode: XdpMode | str = XdpMode.AUTO
    ) -> XdpLink:
        try:
            how = XdpMode(mode)
        except ValueError:
            raise ValueError(
                f"XDP mode must be one of {[m.value for m in XdpMode]}, got {mode!r}"
            ) from None
        ifindex = ifindex_of(iface)
        current = attached_id(ifindex)
        if current == program.id:
            return cls(ifindex, program, how)
        ret = lib.bpf_xdp_attach(
            ifindex, program.fd, lib.XDP_FLAGS_UPDATE_IF_NOEXIST | how.flags, ffi.NULL
        )
        if ret == -errno.EBUSY or ret == -errno.EEXIST:
            raise BpfError(
                -ret,
                f"attach {program.name} to XDP of ifindex {ifindex}",
                f"program id {attached_id(ifindex)} is attached there already; "
                "pyebpflb does not replace another XDP program",
            )
        check(ret, f"attach {program.name} to XDP of ifindex {ifindex} ({how.value} mode)")
        return cls(ifindex, program, how)

    def detach(self) -> None:
        if not self.attached:
            return
        opts: Any = ffi.new("struct bpf_xdp_attach_opts *")
        opts.sz = ffi.sizeof("struct bpf_xdp_attach_opts")
        opts.old_prog_fd = self.program.fd
        ret = lib.bpf_xdp_detach(self.ifindex, lib.XDP_FLAGS_REPLACE | self.mode.flags, opts)
        # EEXIST: somebody replaced our program; ENODEV: interface is gone.
        if ret not in (-errno.EEXIST, -errno.ENODEV):
            check(ret, f"detach XDP from ifindex {self.ifindex}")
        self.attached = False

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<XdpLink ifindex={self.ifindex} {self.program.name} {self.mode.value} {state}>"
