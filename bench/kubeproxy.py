"""kube-proxy's rules, written as its proxiers write them, loaded with the real tools.

Only what a ClusterIP service needs for traffic arriving from outside the
node: the iptables proxier's KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* chains
(random fan-out with `-m statistic`, KUBE-MARK-MASQ for hairpin, DNAT), and
the nftables proxier's `service-ips` verdict map -> per-service chains with
`numgen random mod N vmap` -> per-endpoint chains doing `dnat`.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
from collections.abc import Sequence

import pyebpflb as lb


def chain_hash(text: str) -> str:
    """kube-proxy's chain suffix: base32 of a SHA-256, 16 characters."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def svc_port_name(index: int) -> str:
    return f"bench/svc-{index}:http"


def iptables_rules(services: Sequence[lb.Service]) -> str:
    """An iptables-restore input for the nat table, as kube-proxy's iptables mode."""
    chains = [":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]", ":KUBE-POSTROUTING - [0:0]"]
    rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        "-A KUBE-POSTROUTING -j MASQUERADE --random-fully",
    ]
    for index, svc in enumerate(services):
        c, r = service_chains(index, svc)
        chains += c
        rules += r
    lines = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        *chains,
        *rules,
        "COMMIT",
        "",
    ]
    return "\n".join(lines)


def service_chains(index: int, svc: lb.Service) -> tuple[list[str], list[str]]:
    """The chains and rules of one service: KUBE-SERVICES entry, KUBE-SVC, KUBE-SEPs."""
    name = svc_port_name(index)
    proto = svc.protocol.value
    svc_chain = f"KUBE-SVC-{chain_hash(name + proto)}"
    chains = [f":{svc_chain} - [0:0]"]
    rules = [
        f'-A KUBE-SERVICES -d {svc.vip}/32 -p {proto} -m comment --comment "{name} cluster IP" '
        f"-m {proto} --dport {svc.port} -j {svc_chain}"
    ]
    count = len(svc.backends)
    for i, backend in enumerate(svc.backends):
        sep = f"KUBE-SEP-{chain_hash(name + proto + str(backend))}"
        chains.append(f":{sep} - [0:0]")
        chance = (
            f"-m statistic --mode random --probability {1 / (count - i):.11f} "
            if i < count - 1
            else ""
        )
        rules.append(f'-A {svc_chain} -m comment --comment "{name} -> {backend}" {chance}-j {sep}')
        rules.append(
            f'-A {sep} -s {backend.address}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ'
        )
        rules.append(
            f'-A {sep} -p {proto} -m comment --comment "{name}" -m {proto} '
            f"-j DNAT --to-destination {backend}"
        )
    return chains, rules


def iptables_update(index: int, old: lb.Service, new: lb.Service) -> str:
    """kube-proxy's partial sync for one changed service (iptables-restore --noflush):
    declaring a chain flushes it; endpoints that left lose their chains."""
    chains, rules = service_chains(index, new)
    old_chains, _ = service_chains(index, old)
    gone = [c[1:].split()[0] for c in old_chains if c not in chains]
    own = [r for r in rules if not r.startswith("-A KUBE-SERVICES")]
    return "\n".join(
        [
            "*nat",
            *chains,
            *(f":{c} - [0:0]" for c in gone),
            *own,
            *(f"-X {c}" for c in gone),
            "COMMIT",
            "",
        ]
    )


def nft_rules(services: Sequence[lb.Service]) -> str:
    """An `nft -f` input, as kube-proxy's nftables mode (table ip kube-proxy)."""
    lines = [
        "table ip kube-proxy {",
        "  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }",
        "  chain mark-for-masquerade { meta mark set meta mark | 0x4000; }",
        "  chain masquerading { type nat hook postrouting priority srcnat; policy accept;",
        "    meta mark & 0x4000 == 0 return; meta mark set meta mark ^ 0x4000;",
        "    masquerade fully-random; }",
        "  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }",
        "  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept;",
        "    jump services; }",
    ]
    elements = []
    for index, svc in enumerate(services):
        chain, body = nft_service(index, svc)
        lines += body
        elements.append(f"{svc.vip} . {svc.protocol.value} . {svc.port} : goto {chain}")
    lines.append("}")
    # Elements in chunks: one `add element` per few thousand keeps nft's parser quick.
    for start in range(0, len(elements), 2000):
        chunk = ", ".join(elements[start : start + 2000])
        lines.append(f"add element ip kube-proxy service-ips {{ {chunk} }}")
    return "\n".join(lines) + "\n"


def nft_service(index: int, svc: lb.Service) -> tuple[str, list[str]]:
    """(chain name, chain definitions) of one service, named as kube-proxy names them."""
    name = svc_port_name(index)
    proto = svc.protocol.value
    where = f"bench/svc-{index}/{proto}/http"
    chain = f"service-{chain_hash(name + proto)[:8]}-{where}"
    endpoints = [
        f"endpoint-{chain_hash(name + str(b))[:8]}-{where}__{b.address}/{b.port}"
        for b in svc.backends
    ]
    verdicts = ", ".join(f"{i} : goto {e}" for i, e in enumerate(endpoints))
    body = [f"  chain {chain} {{ numgen random mod {len(endpoints)} vmap {{ {verdicts} }}; }}"]
    for endpoint, backend in zip(endpoints, svc.backends, strict=True):
        body.append(
            f"  chain {endpoint} {{ ip saddr {backend.address} jump mark-for-masquerade;"
            f" meta l4proto {proto} dnat to {backend}; }}"
        )
    return chain, body


def nft_update(index: int, old: lb.Service, new: lb.Service) -> str:
    """One changed service in one nft transaction, as the nftables proxier does it."""
    chain, body = nft_service(index, new)
    _, old_body = nft_service(index, old)
    gone = [line.split()[1] for line in old_body[1:] if line not in body]
    added = [line for line in body[1:] if line not in old_body]  # new endpoints' chains
    lines = [f"flush chain ip kube-proxy {chain}", "table ip kube-proxy {", *added, body[0], "}"]
    lines += [f"delete chain ip kube-proxy {name}" for name in gone]
    return "\n".join(lines) + "\n"


def run_in(netns: str, command: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(
        ["ip", "netns", "exec", netns, *command], input=stdin, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[:500]}")


def iptables_clear(netns: str) -> None:
    run_in(netns, ["iptables-legacy-restore"], "*nat\nCOMMIT\n")


def nft_clear(netns: str) -> None:
    run_in(netns, ["nft", "flush", "ruleset"])
