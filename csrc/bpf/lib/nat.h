/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Rewriting an address or a port in place, with the checksums updated
 * incrementally by the kernel helpers. The helpers also do the right thing
 * for CHECKSUM_PARTIAL packets from local sockets, where only the
 * pseudo-header part of the L4 checksum is filled in.
 */
#ifndef PYEBPFLB_BPF_NAT_H
#define PYEBPFLB_BPF_NAT_H

#include <linux/bpf.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>

#include "lib/csum.h"
#include "lib/ctx.h"
#include "lib/parse.h"

/* UDP over IPv4 may carry no checksum (0); MARK_MANGLED_0 keeps it so. */
static __always_inline __u64 l4_csum_flags(const struct packet *pkt)
{
	return pkt->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* Is the address at `off` covered by the L4 checksum's pseudo-header? ICMPv4 has none. */
static __always_inline int rewrite_addr(struct ctx_buff *ctx, const struct packet *pkt, __u32 off,
					const union pyebpflb_addr *from,
					const union pyebpflb_addr *to, int pseudo)
{
	__u64 flags = l4_csum_flags(pkt) | (pseudo ? BPF_F_PSEUDO_HDR : 0);

	if (pkt->family == PYEBPFLB_IPV4) {
		if (ctx_l3_csum_replace(ctx, pkt->l3_off + offsetof(struct iphdr, check), from->v4,
					to->v4, sizeof(__u32)))
			return -1;
		if (pseudo && ctx_l4_csum_replace(ctx, pkt->csum_off, from->v4, to->v4,
						  flags | sizeof(__u32)))
			return -1;
		return ctx_store_bytes(ctx, off, &to->v4, sizeof(__u32));
	}
	/*
	 * IPv6 has no header checksum; the L4 one covers both addresses. With a
	 * pseudo-header change the helper also moves a CHECKSUM_COMPLETE
	 * packet's skb->csum by the L4 field's change, which is right for IPv4
	 * (the header checksum moves the other way) but leaves IPv6 short by
	 * the address change: the store accounts for it (BPF_F_RECOMPUTE_CSUM).
	 * Linux 6.16 has BPF_F_IPV6 for this; the store works on every kernel.
	 */
	__s64 diff = bpf_csum_diff((__u32 *)from->v6, 16, (__u32 *)to->v6, 16, 0);

	if (ctx_l4_csum_replace(ctx, pkt->csum_off, 0, diff, flags))
		return -1;
	return ctx_store_bytes_rcsum(ctx, off, to->bytes, 16);
}

static __always_inline int rewrite_port(struct ctx_buff *ctx, const struct packet *pkt, __u32 off,
					__u16 from, __u16 to)
{
	if (ctx_l4_csum_replace(ctx, pkt->csum_off, from, to, l4_csum_flags(pkt) | sizeof(__u16)))
		return -1;
	return ctx_store_bytes(ctx, off, &to, sizeof(to));
}

static __always_inline __u32 saddr_off(const struct packet *pkt)
{
	return pkt->l3_off + (pkt->family == PYEBPFLB_IPV4 ? offsetof(struct iphdr, saddr)
							   : offsetof(struct ipv6hdr, saddr));
}

static __always_inline __u32 daddr_off(const struct packet *pkt)
{
	return pkt->l3_off + (pkt->family == PYEBPFLB_IPV4 ? offsetof(struct iphdr, daddr)
							   : offsetof(struct ipv6hdr, daddr));
}

/*
 * The common case, IPv4 without options: the L4 checksum still goes through
 * the helper (it knows a partial checksum from a full one), but the header
 * checksum is always full, so it and both fields are written directly: three
 * helper calls fewer per packet. `dst` picks destination or source.
 */
static __always_inline int nat_ipv4_direct(struct ctx_buff *ctx, const struct packet *pkt, int dst,
					   __u32 addr, __u16 port)
{
	__u64 flags = l4_csum_flags(pkt);
	__u32 old_addr = dst ? pkt->daddr.v4 : pkt->saddr.v4;
	__u16 old_port = dst ? pkt->dport : pkt->sport;
	void *data, *end;
	struct iphdr *ip;
	__u16 *ports;

	if (ctx_l4_csum_replace(ctx, pkt->csum_off, old_addr, addr,
				flags | BPF_F_PSEUDO_HDR | sizeof(__u32)) ||
	    ctx_l4_csum_replace(ctx, pkt->csum_off, old_port, port, flags | sizeof(__u16)))
		return -1;
	/* The helpers may have moved the data: find the headers again. */
	data = ctx_data(ctx);
	end = ctx_data_end(ctx);
	ip = data + ETH_HLEN;
	ports = data + ETH_HLEN + sizeof(*ip);
	if ((void *)(ports + 2) > end)
		return -1;
	ip->check = csum_update4(ip->check, old_addr, addr);
	if (dst) {
		ip->daddr = addr;
		ports[1] = port;
	} else {
		ip->saddr = addr;
		ports[0] = port;
	}
	return 0;
}

/* Are the IPv4 header (without options) and the ports in the linear part? */
static __always_inline int ipv4_direct(struct ctx_buff *ctx, const struct packet *pkt)
{
	return pkt->family == PYEBPFLB_IPV4 && pkt->l3_hlen_ok &&
	       ctx_data(ctx) + ETH_HLEN + sizeof(struct iphdr) + 4 <= ctx_data_end(ctx);
}

/* Ports sit at the same place in TCP and UDP: source first, destination next. */
static __always_inline int dnat(struct ctx_buff *ctx, const struct packet *pkt,
				const union pyebpflb_addr *addr, __u16 port)
{
	if (ipv4_direct(ctx, pkt))
		return nat_ipv4_direct(ctx, pkt, 1, addr->v4, port);
	if (rewrite_addr(ctx, pkt, daddr_off(pkt), &pkt->daddr, addr, 1))
		return -1;
	return rewrite_port(ctx, pkt, pkt->l4_off + 2, pkt->dport, port);
}

static __always_inline int snat(struct ctx_buff *ctx, const struct packet *pkt,
				const union pyebpflb_addr *addr, __u16 port)
{
	if (ipv4_direct(ctx, pkt))
		return nat_ipv4_direct(ctx, pkt, 0, addr->v4, port);
	if (rewrite_addr(ctx, pkt, saddr_off(pkt), &pkt->saddr, addr, 1))
		return -1;
	return rewrite_port(ctx, pkt, pkt->l4_off, pkt->sport, port);
}

/*
 * Fragments. The first fragment of a datagram is translated as a whole
 * packet would be (its L4 checksum covers the whole datagram, and is updated
 * incrementally as always); it leaves what it became in lb_frag_nat, keyed by
 * the datagram's addresses as they arrived and its id, and every later
 * fragment, which carries no ports, gets the same addresses (no L4 checksum
 * to update in it). A later fragment that arrives before its first is not
 * translated (Cilium drops them; here they pass as unrelated traffic).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct pyebpflb_frag_key);
	__type(value, struct pyebpflb_frag_nat);
} lb_frag_nat SEC(".maps");

static __always_inline void frag_key_of(struct pyebpflb_frag_key *key, const struct packet *pkt)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->saddr = pkt->saddr;
	key->daddr = pkt->daddr;
	key->id = pkt->frag_id;
	key->proto = pkt->proto;
	key->family = pkt->family;
}

/* A first fragment was translated: its source to `saddr` and/or its destination
 * to `daddr` (NULL: kept). Remember it for the rest of the datagram. */
static __always_inline void frag_remember(const struct packet *pkt,
					  const union pyebpflb_addr *saddr,
					  const union pyebpflb_addr *daddr)
{
	struct pyebpflb_frag_nat nat = {};
	struct pyebpflb_frag_key key;

	if (pkt->frag != FRAG_FIRST || pkt->dry)
		return;
	if (saddr) {
		nat.saddr = *saddr;
		nat.rewrite |= PYEBPFLB_FRAG_SADDR;
	}
	if (daddr) {
		nat.daddr = *daddr;
		nat.rewrite |= PYEBPFLB_FRAG_DADDR;
	}
	frag_key_of(&key, pkt);
	bpf_map_update_elem(&lb_frag_nat, &key, &nat, BPF_ANY);
}

/* An address of a fragment without transport header: the IPv4 header checksum
 * only (IPv6 has none; the store keeps a CHECKSUM_COMPLETE skb->csum). */
static __always_inline int rewrite_l3_addr(struct ctx_buff *ctx, const struct packet *pkt,
					   __u32 off, const union pyebpflb_addr *from,
					   const union pyebpflb_addr *to)
{
	if (pkt->family == PYEBPFLB_IPV4) {
		if (ctx_l3_csum_replace(ctx, pkt->l3_off + offsetof(struct iphdr, check), from->v4,
					to->v4, sizeof(__u32)))
			return -1;
		return ctx_store_bytes(ctx, off, &to->v4, sizeof(__u32));
	}
	return ctx_store_bytes_rcsum(ctx, off, to->bytes, 16);
}

/* A later fragment: 1 when its datagram's first was translated (and it is now
 * too), 0 when not, -1 when rewriting failed. */
static __always_inline int frag_follow(struct ctx_buff *ctx, const struct packet *pkt)
{
	struct pyebpflb_frag_nat *known, nat;
	struct pyebpflb_frag_key key;

	frag_key_of(&key, pkt);
	known = bpf_map_lookup_elem(&lb_frag_nat, &key);
	if (!known)
		return 0;
	nat = *known; /* copied: another CPU may replace the entry under us */
	if ((nat.rewrite & PYEBPFLB_FRAG_SADDR) &&
	    rewrite_l3_addr(ctx, pkt, saddr_off(pkt), &pkt->saddr, &nat.saddr))
		return -1;
	if ((nat.rewrite & PYEBPFLB_FRAG_DADDR) &&
	    rewrite_l3_addr(ctx, pkt, daddr_off(pkt), &pkt->daddr, &nat.daddr))
		return -1;
	return 1;
}

#endif
