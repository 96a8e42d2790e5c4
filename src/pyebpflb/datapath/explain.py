"""Explain: what the datapath does with one packet, decided by the real programs on a
synthetic first packet (BPF_PROG_TEST_RUN) that writes nothing."""

from __future__ import annotations

import struct

from pyebpflb._bpf import LoadedObject
from pyebpflb._bpf._libbpf import ffi
from pyebpflb.datapath.results import Explanation
from pyebpflb.datapath.state import State
from pyebpflb.events import verdict_of
from pyebpflb.layout import (
    DROP_REASONS,
    EXPLAIN_ACTION_MASK,
    EXPLAIN_DEFAULT,
    EXPLAIN_MARK,
    EXPLAIN_SLOTS,
    ExplainSlot,
)
from pyebpflb.maps import ACTION_OF
from pyebpflb.model import (
    Address,
    Direction,
    Protocol,
    endpoint_text,
    parse_endpoint,
    to_direction,
    to_protocol,
)

_TC_ACT_SHOT = 2
# The start of a struct __sk_buff, as BPF_PROG_TEST_RUN takes it: up to the end of cb[].
_CB = ffi.offsetof("struct __sk_buff", "cb")
_CTX_SIZE = _CB + 4 * EXPLAIN_SLOTS
_MARK = ffi.offsetof("struct __sk_buff", "mark")


def explain(
    obj: LoadedObject, state: State, src: str, dst: str, protocol: str, direction: str
) -> Explanation:
    source, sport = parse_endpoint(src, "src", default_port=40000)
    target, dport = parse_endpoint(dst, "dst", default_port=None)
    if source.version != target.version:
        raise ValueError(f"src {src!r} and dst {dst!r} are of different IP versions")
    proto = to_protocol(protocol)
    where = to_direction(direction)
    ctx = bytearray(_CTX_SIZE)
    struct.pack_into("=I", ctx, _MARK, EXPLAIN_MARK)
    program = obj.program(f"lb_{where.value}")
    result = program.test_run(probe(source, sport, target, dport, proto), ctx=bytes(ctx))
    cb = struct.unpack_from(f"={EXPLAIN_SLOTS}I", result.ctx, _CB)
    service_id, backend_id = cb[ExplainSlot.SERVICE], cb[ExplainSlot.BACKEND]
    installed = state.snapshot.by_id(service_id) if service_id else None
    backend = None
    if installed is not None and backend_id in installed.backend_ids:
        backend = installed.service.backends[installed.backend_ids.index(backend_id)]
    ref = state.policy.ref(cb[ExplainSlot.RULE])
    local = target if where is Direction.INGRESS else source
    if backend is not None and where is Direction.INGRESS:
        local = backend.address
    selecting = [
        p
        for _, p in state.policy.policies.values()
        if p.direction is where and p.subjects and p.selects(local)
    ]
    held = [s for p in selecting for s in p.subjects if s.version == local.version and local in s]
    drop_reason = DROP_REASONS.get(cb[ExplainSlot.DROP])
    policy_code = cb[ExplainSlot.POLICY]
    return Explanation(
        source=endpoint_text(source, sport),
        destination=endpoint_text(target, dport),
        protocol=proto,
        direction=where,
        verdict=verdict_of(
            drop_reason, shot=result.retval == _TC_ACT_SHOT, translated=installed is not None
        ),
        service=installed.service if installed is not None else None,
        backend=backend,
        policy_verdict=ACTION_OF[(policy_code & EXPLAIN_ACTION_MASK) - 1] if policy_code else None,
        policy=ref.policy if ref is not None else None,
        rule=ref.index if ref is not None else None,
        policy_default=bool(policy_code & EXPLAIN_DEFAULT),
        drop_reason=drop_reason,
        endpoint=str(local),
        subject=str(max(held, key=lambda s: s.prefixlen)) if held else None,
        selected_by=tuple(p.name for p in selecting),
        origin=ref.rule.origin if ref is not None else None,
    )


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def probe(source: Address, sport: int, target: Address, dport: int, protocol: Protocol) -> bytes:
    """An Ethernet frame with a TCP SYN or a UDP datagram, checksums right."""
    number = protocol.number
    if protocol is Protocol.TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
        at = 16
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + 7, 0) + b"explain"
        at = 6
    if source.version == 4:
        pseudo = source.packed + target.packed + struct.pack("!BBH", 0, number, len(l4))
    else:
        pseudo = source.packed + target.packed + struct.pack("!I3xB", len(l4), number)
    l4 = l4[:at] + struct.pack("!H", checksum(pseudo + l4)) + l4[at + 2 :]
    if source.version == 4:
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, number, 0, source.packed,
            target.packed,
        )  # fmt: skip
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        ethertype = 0x0800
    else:
        header = struct.pack(
            "!IHBB16s16s", 6 << 28, len(l4), number, 64, source.packed, target.packed
        )
        ethertype = 0x86DD
    ether = bytes.fromhex("020000000002020000000001") + struct.pack("!H", ethertype)
    return ether + header + l4


__all__ = ["checksum", "explain", "probe"]
