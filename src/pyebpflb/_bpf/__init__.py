"""A small, Pythonic layer over libbpf 1.1 (cffi, API mode).

Not a mirror of libbpf: objects open from bytes and load; maps are typed by
the structs of ``csrc/include``; programs run on crafted packets; links attach
to tc, XDP and cgroups and detach on close. Everything below ``datapath``
talks to the kernel through this package.
"""

from pyebpflb._bpf import log as _log  # noqa: F401  (routes libbpf's messages first)
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb._bpf.cgroup import CgroupLink
from pyebpflb._bpf.link import Link
from pyebpflb._bpf.map import Map, MapType, UpdateFlag, possible_cpus
from pyebpflb._bpf.object import LoadedObject, MapSpec, Object, OpenObject
from pyebpflb._bpf.program import Program, ProgramType, TestRun
from pyebpflb._bpf.ringbuf import RingBuffer
from pyebpflb._bpf.tc import TcLink
from pyebpflb._bpf.xdp import XdpLink, XdpMode
from pyebpflb.model import Direction


def libbpf_version() -> str:
    """The version of the libbpf this binding was linked against at run time."""
    return f"{lib.libbpf_major_version()}.{lib.libbpf_minor_version()}"


__all__ = [
    "CgroupLink",
    "Direction",
    "Link",
    "LoadedObject",
    "Map",
    "MapSpec",
    "MapType",
    "Object",
    "OpenObject",
    "Program",
    "ProgramType",
    "RingBuffer",
    "TcLink",
    "TestRun",
    "UpdateFlag",
    "XdpLink",
    "XdpMode",
    "ffi",
    "libbpf_version",
    "possible_cpus",
]
