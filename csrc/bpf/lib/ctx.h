/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The packet context: one set of accessors over tc's struct __sk_buff and
 * XDP's struct xdp_md, so that parsing, NAT, conntrack, policy and events
 * are written once and compile into either kind of program. A program for
 * XDP defines PYEBPFLB_CTX_XDP before its first include (lb_xdp.bpf.c); tc
 * is the default. Every lib/ function takes a `struct ctx_buff *ctx`.
 *
 * What differs:
 * - Checksums. On tc a packet from a local socket may carry a partial
 *   checksum (CHECKSUM_PARTIAL, only the pseudo-header summed), which only
 *   the kernel's csum helpers update correctly. XDP sees frames before the
 *   kernel made an skb of them: their checksums are complete, and are
 *   updated here in software with the same arguments as the helpers.
 * - Resizing and sending back: bpf_skb_adjust_room/change_tail and
 *   bpf_redirect to the arrival device on tc; adjust_head/tail and XDP_TX.
 * - Explain (Datapath.explain) runs tc programs through BPF_PROG_TEST_RUN
 *   and reads the decision from skb->cb; XDP has no cb, so an XDP program
 *   never explains (ctx_probing is 0).
 * - A socket program (PYEBPFLB_CTX_SOCK) has no packet at all: see below.
 * - XDP reads the EtherType from the frame; tc takes skb->protocol, which is
 *   the inner protocol when the device stripped a VLAN tag.
 */
#ifndef PYEBPFLB_BPF_CTX_H
#define PYEBPFLB_BPF_CTX_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/csum.h"

#if defined(PYEBPFLB_CTX_XDP)
#define ctx_buff xdp_md
#define CTX_PASS XDP_PASS
#define CTX_DROP XDP_DROP
#elif defined(PYEBPFLB_CTX_SOCK)
#define ctx_buff bpf_sock_addr
#define CTX_PASS 1
#define CTX_DROP 0
#else
#define ctx_buff __sk_buff
#define CTX_PASS TC_ACT_OK
#define CTX_DROP TC_ACT_SHOT
#endif

#if defined(PYEBPFLB_CTX_SOCK)

/*
 * A socket program (lb_sock.bpf.c) decides at connect() and sendmsg(): there
 * is no packet, so every accessor of packet bytes fails and the length is 0
 * (counters count connections, not bytes). The steps it shares with the
 * packet programs (choosing a backend, policy, counters, events) never reach
 * the packet bytes.
 */
static __always_inline void *ctx_data(const struct bpf_sock_addr *ctx)
{
	return (void *)0;
}

static __always_inline void *ctx_data_end(const struct bpf_sock_addr *ctx)
{
	return (void *)0;
}

static __always_inline __u32 ctx_len(const struct bpf_sock_addr *ctx)
{
	return 0;
}

/* Events of the socket path carry ifindex 0: no interface saw them. */
static __always_inline __u32 ctx_ifindex(const struct bpf_sock_addr *ctx)
{
	return 0;
}

static __always_inline __be16 ctx_protocol(const struct bpf_sock_addr *ctx)
{
	return 0;
}

static __always_inline int ctx_load_bytes(const struct bpf_sock_addr *ctx, __u32 off, void *to,
					  __u32 len)
{
	return -1;
}

static __always_inline int ctx_store_bytes(struct bpf_sock_addr *ctx, __u32 off, const void *from,
					   __u32 len)
{
	return -1;
}

static __always_inline int ctx_store_bytes_rcsum(struct bpf_sock_addr *ctx, __u32 off,
						 const void *from, __u32 len)
{
	return -1;
}

static __always_inline int ctx_l3_csum_replace(struct bpf_sock_addr *ctx, __u32 off, __u64 from,
					       __u64 to, __u64 size)
{
	return -1;
}

static __always_inline int ctx_l4_csum_replace(struct bpf_sock_addr *ctx, __u32 off, __u64 from,
					       __u64 to, __u64 flags)
{
	return -1;
}

static __always_inline int ctx_grow_after_l3(struct bpf_sock_addr *ctx, __u32 len)
{
	return -1;
}

static __always_inline int ctx_grow_after_mac(struct bpf_sock_addr *ctx, __u32 len)
{
	return -1;
}

static __always_inline int ctx_set_len(struct bpf_sock_addr *ctx, __u32 len)
{
	return -1;
}

static __always_inline int ctx_bounce(struct bpf_sock_addr *ctx)
{
	return CTX_DROP;
}

static __always_inline __u32 ctx_ingress_ifindex(const struct bpf_sock_addr *ctx)
{
	return 0;
}

static __always_inline int ctx_redirect(struct bpf_sock_addr *ctx, __u32 ifindex, int resolved)
{
	return CTX_DROP;
}

static __always_inline int ctx_probing(const struct bpf_sock_addr *ctx)
{
	return 0;
}

static __always_inline void ctx_explain(struct bpf_sock_addr *ctx, int slot, __u32 value)
{
}

#else /* packets: XDP or tc */

static __always_inline void *ctx_data(const struct ctx_buff *ctx)
{
	return (void *)(long)ctx->data;
}

static __always_inline void *ctx_data_end(const struct ctx_buff *ctx)
{
	return (void *)(long)ctx->data_end;
}

#ifdef PYEBPFLB_CTX_XDP

/* The frame's whole length, fragments of a multi-buffer frame included. */
static __always_inline __u32 ctx_len(struct xdp_md *ctx)
{
	return bpf_xdp_get_buff_len(ctx);
}

static __always_inline __u32 ctx_ifindex(const struct xdp_md *ctx)
{
	return ctx->ingress_ifindex;
}

static __always_inline __be16 ctx_protocol(struct xdp_md *ctx)
{
	struct ethhdr *eth = ctx_data(ctx);

	if ((void *)(eth + 1) > ctx_data_end(ctx))
		return 0;
	return eth->h_proto;
}

static __always_inline int ctx_load_bytes(struct xdp_md *ctx, __u32 off, void *to, __u32 len)
{
	return bpf_xdp_load_bytes(ctx, off, to, len);
}

static __always_inline int ctx_store_bytes(struct xdp_md *ctx, __u32 off, const void *from,
					   __u32 len)
{
	return bpf_xdp_store_bytes(ctx, off, (void *)from, len);
}

/* XDP frames carry no skb->csum to keep. */
static __always_inline int ctx_store_bytes_rcsum(struct xdp_md *ctx, __u32 off, const void *from,
						 __u32 len)
{
	return ctx_store_bytes(ctx, off, from, len);
}

/* The checksum at `off` with `from` replaced by `to`, as the tc helpers take
 * them: `size` 2 or 4 for a field, 0 for a bpf_csum_diff result in `to`. */
static __always_inline __u16 ctx_csum_replaced(__u16 check, __u64 from, __u64 to, __u64 size)
{
	if (size == 2)
		return csum_update2(check, from, to);
	if (size == 4)
		return csum_update4(check, from, to);
	return csum_update_diff(check, to);
}

static __always_inline int ctx_l3_csum_replace(struct xdp_md *ctx, __u32 off, __u64 from, __u64 to,
					       __u64 size)
{
	__u16 check;

	if (bpf_xdp_load_bytes(ctx, off, &check, sizeof(check)))
		return -1;
	check = ctx_csum_replaced(check, from, to, size & BPF_F_HDR_FIELD_MASK);
	return bpf_xdp_store_bytes(ctx, off, &check, sizeof(check));
}

/* BPF_F_PSEUDO_HDR changes nothing for a complete checksum. MARK_MANGLED_0
 * keeps UDP's "no checksum" (0) and writes a computed 0 as 0xffff. */
static __always_inline int ctx_l4_csum_replace(struct xdp_md *ctx, __u32 off, __u64 from, __u64 to,
					       __u64 flags)
{
	int mangled_0 = !!(flags & BPF_F_MARK_MANGLED_0);
	__u16 check;

	if (bpf_xdp_load_bytes(ctx, off, &check, sizeof(check)))
		return -1;
	if (mangled_0 && !check)
		return 0;
	check = ctx_csum_replaced(check, from, to, flags & BPF_F_HDR_FIELD_MASK);
	if (mangled_0 && !check)
		check = 0xffff;
	return bpf_xdp_store_bytes(ctx, off, &check, sizeof(check));
}

/* Insert `len` bytes between the Ethernet header and the IP header. */
/* XDP can only move the frame's start: no room between the L3 and L4 headers. */
static __always_inline int ctx_grow_after_l3(struct xdp_md *ctx, __u32 len)
{
	return -1;
}

static __always_inline int ctx_grow_after_mac(struct xdp_md *ctx, __u32 len)
{
	struct ethhdr eth;
	void *data;

	if (len > 256 || bpf_xdp_load_bytes(ctx, 0, &eth, sizeof(eth)) ||
	    bpf_xdp_adjust_head(ctx, -(int)len))
		return -1;
	data = ctx_data(ctx);
	if (data + sizeof(eth) > ctx_data_end(ctx))
		return -1;
	__builtin_memcpy(data, &eth, sizeof(eth));
	return 0;
}

static __always_inline int ctx_set_len(struct xdp_md *ctx, __u32 len)
{
	return bpf_xdp_adjust_tail(ctx, (int)len - (int)bpf_xdp_get_buff_len(ctx));
}

/* Send the (rewritten) frame back out of the device it arrived on. */
static __always_inline int ctx_bounce(struct xdp_md *ctx)
{
	return XDP_TX;
}

static __always_inline __u32 ctx_ingress_ifindex(const struct xdp_md *ctx)
{
	return ctx->ingress_ifindex;
}

/* Send the frame out of `ifindex`, its Ethernet addresses set when `resolved`
 * (XDP cannot resolve a neighbour: such a frame is dropped). */
static __always_inline int ctx_redirect(struct xdp_md *ctx, __u32 ifindex, int resolved)
{
	if (!resolved)
		return XDP_DROP;
	return ifindex == ctx->ingress_ifindex ? XDP_TX : bpf_redirect(ifindex, 0);
}

static __always_inline int ctx_probing(const struct xdp_md *ctx)
{
	return 0;
}

static __always_inline void ctx_explain(struct xdp_md *ctx, int slot, __u32 value)
{
}

#else /* tc */

static __always_inline __u32 ctx_len(const struct __sk_buff *ctx)
{
	return ctx->len;
}

static __always_inline __u32 ctx_ifindex(const struct __sk_buff *ctx)
{
	return ctx->ifindex;
}

static __always_inline __be16 ctx_protocol(const struct __sk_buff *ctx)
{
	return ctx->protocol;
}

static __always_inline int ctx_load_bytes(const struct __sk_buff *ctx, __u32 off, void *to,
					  __u32 len)
{
	return bpf_skb_load_bytes(ctx, off, to, len);
}

static __always_inline int ctx_store_bytes(struct __sk_buff *ctx, __u32 off, const void *from,
					   __u32 len)
{
	return bpf_skb_store_bytes(ctx, off, from, len, 0);
}

/* Store, and keep a CHECKSUM_COMPLETE packet's skb->csum (the sum of its
 * bytes) in step with the change. */
static __always_inline int ctx_store_bytes_rcsum(struct __sk_buff *ctx, __u32 off, const void *from,
						 __u32 len)
{
	return bpf_skb_store_bytes(ctx, off, from, len, BPF_F_RECOMPUTE_CSUM);
}

static __always_inline int ctx_l3_csum_replace(struct __sk_buff *ctx, __u32 off, __u64 from,
					       __u64 to, __u64 size)
{
	return bpf_l3_csum_replace(ctx, off, from, to, size);
}

static __always_inline int ctx_l4_csum_replace(struct __sk_buff *ctx, __u32 off, __u64 from,
					       __u64 to, __u64 flags)
{
	return bpf_l4_csum_replace(ctx, off, from, to, flags);
}

/* Room for `len` bytes between the IP header and what follows it (IPv4 options,
 * an IPv6 extension header). */
static __always_inline int ctx_grow_after_l3(struct __sk_buff *ctx, __u32 len)
{
	return bpf_skb_adjust_room(ctx, len, BPF_ADJ_ROOM_NET, 0);
}

static __always_inline int ctx_grow_after_mac(struct __sk_buff *ctx, __u32 len)
{
	return bpf_skb_adjust_room(ctx, len, BPF_ADJ_ROOM_MAC, 0);
}

static __always_inline int ctx_set_len(struct __sk_buff *ctx, __u32 len)
{
	return bpf_skb_change_tail(ctx, len, 0);
}

static __always_inline int ctx_bounce(struct __sk_buff *ctx)
{
	return bpf_redirect(ctx->ifindex, 0);
}

static __always_inline __u32 ctx_ingress_ifindex(const struct __sk_buff *ctx)
{
	return ctx->ingress_ifindex;
}

/* Send the packet out of `ifindex`: its Ethernet addresses set when
 * `resolved`, else the kernel resolves the next hop's (bpf_redirect_neigh). */
static __always_inline int ctx_redirect(struct __sk_buff *ctx, __u32 ifindex, int resolved)
{
	return resolved ? bpf_redirect(ifindex, 0) : bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

/*
 * Explain runs a packet through BPF_PROG_TEST_RUN with this mark: the program
 * decides as for real traffic but writes no map (no conntrack, counter,
 * affinity or event) and reports what it decided in skb->cb. Test runs come
 * in on the loopback device (ifindex 1), where the datapath is never
 * attached, so real traffic never takes this path.
 */
static __always_inline int ctx_probing(const struct __sk_buff *ctx)
{
	return ctx->mark == PYEBPFLB_EXPLAIN_MARK && ctx->ifindex == 1;
}

/* A constant slot at every call site: the verifier sees a fixed cb offset. */
static __always_inline void ctx_explain(struct __sk_buff *ctx, int slot, __u32 value)
{
	if (slot >= 0 && slot < PYEBPFLB_EXPLAIN_SLOTS)
		ctx->cb[slot] = value;
}

#endif /* tc */

#endif /* packets */

#endif
