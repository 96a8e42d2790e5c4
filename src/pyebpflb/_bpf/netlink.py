"""The one rtnetlink query libbpf does not offer: listing an interface's tc filters.

libbpf can query a filter it knows the handle and priority of, but not tell
whether a clsact qdisc still holds anybody's filters; a detach needs exactly
that before it may remove a qdisc it created. The socket is opened in the
calling thread's network namespace, like libbpf's own.
"""

from __future__ import annotations

import errno
import socket
import struct

from pyebpflb.errors import from_errno

_RTM_GETTFILTER = 46
_RTM_NEWTFILTER = 44
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info

TC_H_CLSACT = 0xFFFFFFF1
TC_H_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
TC_H_EGRESS = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)


def count_filters(ifindex: int, parent: int) -> int:
    """How many tc filters hang off ``parent`` (ingress or egress) of ``ifindex``."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        body = _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, parent, 0)
        header = _NLMSG_HDR.pack(
            _NLMSG_HDR.size + len(body), _RTM_GETTFILTER, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
        )
        sock.sendto(header + body, (0, 0))
        count = 0
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSG_HDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data, offset)
                if kind == _NLMSG_DONE:
                    return count
                if kind == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + _NLMSG_HDR.size)
                    if code == -errno.EINVAL or code == -errno.ENOENT:
                        return 0  # no clsact qdisc: nothing hangs off it
                    if code < 0:
                        raise from_errno(-code, f"list tc filters of ifindex {ifindex}")
                    return count
                # The kernel also reports each (priority, protocol) slot
                # itself, with handle 0; only real filters have a handle.
                if kind == _RTM_NEWTFILTER:
                    _, _, handle, _, _ = _TCMSG.unpack_from(data, offset + _NLMSG_HDR.size)
                    count += handle != 0
                offset += (length + 3) & ~3
                if length == 0:
                    raise OSError(errno.EPROTO, "malformed netlink reply")


def ifindex_of(iface: str | int) -> int:
    """The index of an interface (by name or index) of the current netns."""
    if isinstance(iface, int):
        return iface
    try:
        return socket.if_nametoindex(iface)
    except OSError:
        raise ValueError(
            f"no interface named {iface!r} in this network namespace "
            f"(it has: {', '.join(name for _, name in socket.if_nameindex())})"
        ) from None


__all__ = ["TC_H_EGRESS", "TC_H_INGRESS", "count_filters", "ifindex_of"]
