"""The numbers of ``csrc/include/pyebpflb/lb.h`` that Python needs, read from the
header through the cffi binding (built from the same file), never restated.

Pure: importing this needs the compiled binding but no kernel and no privilege.
"""

from __future__ import annotations

import enum

from pyebpflb._bpf._libbpf import ffi, lib

DATAPATH_NAME_MAX = len(ffi.new("struct pyebpflb_lb_config *").name) - 1
FAMILY_TAG = {4: int(lib.PYEBPFLB_IPV4), 6: int(lib.PYEBPFLB_IPV6)}
SLOT_GEN_SHIFT = int(lib.PYEBPFLB_SLOT_GEN_SHIFT)
POLICY_GEN_SHIFT = int(lib.PYEBPFLB_POLICY_GEN_SHIFT)
POLICY_RULESET = int(lib.PYEBPFLB_POLICY_RULESET)  # scope bit: a rule set of endpoints


class PolicyProto(enum.IntEnum):
    """enum pyebpflb_policy_proto: what a rule's protocol is matched against."""

    TCP = lib.PYEBPFLB_POLICY_TCP
    UDP = lib.PYEBPFLB_POLICY_UDP
    ICMP = lib.PYEBPFLB_POLICY_ICMP
    OTHER = lib.PYEBPFLB_POLICY_OTHER
    TCP_NOPORT = lib.PYEBPFLB_POLICY_TCP_NOPORT
    UDP_NOPORT = lib.PYEBPFLB_POLICY_UDP_NOPORT
    SCTP = lib.PYEBPFLB_POLICY_SCTP
    SCTP_NOPORT = lib.PYEBPFLB_POLICY_SCTP_NOPORT


# Port ranges a policy class carries in its first-trie entry (more spill into the second).
POLICY_INLINE = int(lib.PYEBPFLB_POLICY_INLINE)
# An inline piece's proto meaning every protocol (last in its class).
POLICY_PIECE_EVERY = int(lib.PYEBPFLB_POLICY_PIECE_EVERY)


class EventType(enum.IntEnum):
    """enum pyebpflb_event_type."""

    TRACE = lib.PYEBPFLB_EVENT_TRACE
    DROP = lib.PYEBPFLB_EVENT_DROP
    POLICY = lib.PYEBPFLB_EVENT_POLICY

    @property
    def label(self) -> str:
        return self.name.lower()


class DropReason(enum.IntEnum):
    """enum pyebpflb_drop_reason: the index of lb_drops."""

    NO_BACKEND = lib.PYEBPFLB_DROP_NO_BACKEND
    CT_FULL = lib.PYEBPFLB_DROP_CT_FULL
    REJECT_FAILED = lib.PYEBPFLB_DROP_REJECT_FAILED
    POLICY_DENIED = lib.PYEBPFLB_DROP_POLICY_DENIED
    MALFORMED = lib.PYEBPFLB_DROP_MALFORMED
    UNSUPPORTED = lib.PYEBPFLB_DROP_UNSUPPORTED
    TUPLE_IN_USE = lib.PYEBPFLB_DROP_TUPLE_IN_USE
    BACKEND_GONE = lib.PYEBPFLB_DROP_BACKEND_GONE
    NO_LOCAL_BACKEND = lib.PYEBPFLB_DROP_NO_LOCAL_BACKEND
    NO_SERVICE_PORT = lib.PYEBPFLB_DROP_NO_SERVICE_PORT
    SOURCE_RANGE = lib.PYEBPFLB_DROP_SOURCE_RANGE
    NO_NAT_PORT = lib.PYEBPFLB_DROP_NO_NAT_PORT
    NO_ROUTE = lib.PYEBPFLB_DROP_NO_ROUTE

    @property
    def label(self) -> str:
        """How people read it: "no backend", "conntrack full", ..."""
        return _DROP_LABELS[self]


_DROP_LABELS = {
    DropReason.NO_BACKEND: "no backend",
    DropReason.CT_FULL: "conntrack full",
    DropReason.REJECT_FAILED: "reject failed",
    DropReason.POLICY_DENIED: "policy denied",
    DropReason.MALFORMED: "malformed packet",
    DropReason.UNSUPPORTED: "unsupported packet",
    DropReason.TUPLE_IN_USE: "tuple in use",
    DropReason.BACKEND_GONE: "backend gone",
    DropReason.NO_LOCAL_BACKEND: "no local backend",
    DropReason.NO_SERVICE_PORT: "no service port",
    DropReason.SOURCE_RANGE: "source range",
    DropReason.NO_NAT_PORT: "no nat port",
    DropReason.NO_ROUTE: "no route",
}
# Drop reason code -> its label, in code order.
DROP_REASONS = {int(reason): reason.label for reason in DropReason}


class CtKind(enum.IntEnum):
    """enum pyebpflb_ct_dir: what a conntrack entry is."""

    SERVICE = lib.PYEBPFLB_CT_SERVICE
    REPLY = lib.PYEBPFLB_CT_REPLY
    POLICY_IN = lib.PYEBPFLB_CT_POLICY_IN
    POLICY_OUT = lib.PYEBPFLB_CT_POLICY_OUT

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class ExplainSlot(enum.IntEnum):
    """enum pyebpflb_explain: where a dry run reports each decision in skb->cb."""

    SERVICE = lib.PYEBPFLB_EXPLAIN_SERVICE
    BACKEND = lib.PYEBPFLB_EXPLAIN_BACKEND
    RULE = lib.PYEBPFLB_EXPLAIN_RULE
    POLICY = lib.PYEBPFLB_EXPLAIN_POLICY
    DROP = lib.PYEBPFLB_EXPLAIN_DROP


EXPLAIN_SLOTS = int(lib.PYEBPFLB_EXPLAIN_SLOTS)
EXPLAIN_ACTION_MASK = int(lib.PYEBPFLB_EXPLAIN_ACTION_MASK)
EXPLAIN_DEFAULT = int(lib.PYEBPFLB_EXPLAIN_DEFAULT)
EXPLAIN_MARK = int(lib.PYEBPFLB_EXPLAIN_MARK) & 0xFFFFFFFF
