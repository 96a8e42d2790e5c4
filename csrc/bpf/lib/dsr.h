/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Direct server return (Cilium's DSR with an IP option / IPv6 extension
 * header): external traffic to a backend on another node keeps the client's
 * address; the first packet of the flow (a TCP SYN; every UDP datagram)
 * carries the frontend it was sent to, in an IPv4 option or an IPv6
 * destination options header after the DNAT. The backend's node reads it,
 * records the flow (lib/ct.h, as if it had balanced it itself), and its
 * egress translates the backend's answers back to the frontend, which leave
 * for the client from there: the balancing node sees only one direction.
 *
 * The option is inserted only into packets with no IPv4 options or IPv6
 * extension headers of their own (balance.h picks SNAT for the others), so
 * it always sits right after the fixed IP header. Unknown options are
 * ignored by every stack on the way: the IPv4 option has the "copied" bit
 * (fragments keep it), the IPv6 option's type starts with 00 ("skip").
 */
#ifndef PYEBPFLB_BPF_DSR_H
#define PYEBPFLB_BPF_DSR_H

#include <linux/bpf.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/csum.h"
#include "lib/ct.h"
#include "lib/ctx.h"
#include "lib/parse.h"

#define DSR_OPT4_TYPE 0x9a /* copied, class 0, number 26 (as Cilium's) */
#define DSR_OPT4_LEN  8	   /* type, length, port, IPv4 address */
#define DSR_OPT6_TYPE 0x1b /* 00: skip when not understood */
#define DSR_OPT6_LEN  18   /* port, IPv6 address */
#define DSR_EXT6_LEN  24   /* next header, length, the option, PadN of 2 */
#define NEXTHDR_DEST  60
#define NEXTHDR_DEST  60 /* IPv6 destination options */
#define IPV4_HDR_LEN  20
#define IPV6_HDR_LEN  40

/* Can the packet carry the option (nothing between its IP and L4 headers)? */
static __always_inline int dsr_fits(const struct packet *pkt)
{
	if (pkt->family == PYEBPFLB_IPV4)
		return pkt->l3_hlen_ok;
	return pkt->l4_off == pkt->l3_off + IPV6_HDR_LEN;
}

/* Does this packet of a DSR flow carry the option (the flow's first)? */
static __always_inline int dsr_marks(const struct packet *pkt)
{
	return pkt->proto == IPPROTO_UDP ||
	       ((pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN);
}

struct dsr_header4 {
	struct iphdr ip;
	__u8 type;
	__u8 len;
	__u16 port;
	__u32 addr;
};

struct dsr_header6 {
	struct ipv6hdr ip;
	__u8 next;
	__u8 hdrlen; /* in 8 bytes, the first 8 not counted */
	__u8 type;
	__u8 len;
	__u16 port;
	__u8 addr[16]; /* bytes: a __u32 array would be padded to its alignment */
	__u8 pad_type; /* PadN */
	__u8 pad_len;
};

_Static_assert(sizeof(struct dsr_header4) == IPV4_HDR_LEN + DSR_OPT4_LEN, "dsr_header4");
_Static_assert(sizeof(struct dsr_header6) == IPV6_HDR_LEN + DSR_EXT6_LEN, "dsr_header6");

/* The headers being read or written: in the caller's per-CPU scratch slot. */
union dsr_header {
	struct dsr_header4 v4;
	struct dsr_header6 v6;
};

/* Insert the frontend `vip`:`port` into a packet that fits (0, or -1). */
static __always_inline int dsr_add(struct ctx_buff *ctx, const struct packet *pkt,
				   union dsr_header *buf, const union pyebpflb_addr *vip,
				   __u16 port)
{
	if (pkt->family == PYEBPFLB_IPV4) {
		struct dsr_header4 *hdr = &buf->v4;

		if (ctx_load_bytes(ctx, pkt->l3_off, &hdr->ip, sizeof(hdr->ip)) ||
		    ctx_grow_after_l3(ctx, DSR_OPT4_LEN))
			return -1;
		hdr->ip.ihl = (IPV4_HDR_LEN + DSR_OPT4_LEN) / 4;
		hdr->ip.tot_len = bpf_htons(bpf_ntohs(hdr->ip.tot_len) + DSR_OPT4_LEN);
		hdr->ip.check = 0;
		hdr->type = DSR_OPT4_TYPE;
		hdr->len = DSR_OPT4_LEN;
		hdr->port = port;
		hdr->addr = vip->v4;
		hdr->ip.check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)hdr, sizeof(*hdr), 0));
		return ctx_store_bytes_rcsum(ctx, pkt->l3_off, hdr, sizeof(*hdr));
	}
	struct dsr_header6 *hdr6 = &buf->v6;

	if (ctx_load_bytes(ctx, pkt->l3_off, &hdr6->ip, sizeof(hdr6->ip)) ||
	    ctx_grow_after_l3(ctx, DSR_EXT6_LEN))
		return -1;
	hdr6->next = hdr6->ip.nexthdr;
	hdr6->ip.nexthdr = NEXTHDR_DEST;
	hdr6->ip.payload_len = bpf_htons(bpf_ntohs(hdr6->ip.payload_len) + DSR_EXT6_LEN);
	hdr6->hdrlen = DSR_EXT6_LEN / 8 - 1;
	hdr6->type = DSR_OPT6_TYPE;
	hdr6->len = DSR_OPT6_LEN;
	hdr6->port = port;
	__builtin_memcpy(hdr6->addr, vip->v6, 16);
	hdr6->pad_type = 1;
	hdr6->pad_len = 0;
	return ctx_store_bytes_rcsum(ctx, pkt->l3_off, hdr6, sizeof(*hdr6));
}

/* The frontend a DSR packet was sent to, when it carries one (1). */
static __always_inline int dsr_frontend(struct ctx_buff *ctx, const struct packet *pkt,
					union dsr_header *buf, union pyebpflb_addr *vip,
					__u16 *port)
{
	if (pkt->family == PYEBPFLB_IPV4) {
		struct dsr_header4 *hdr = &buf->v4;

		if (pkt->l3_hlen_ok || pkt->l4_off < pkt->l3_off + sizeof(*hdr) ||
		    ctx_load_bytes(ctx, pkt->l3_off, hdr, sizeof(*hdr)) ||
		    hdr->type != DSR_OPT4_TYPE || hdr->len != DSR_OPT4_LEN)
			return 0;
		__builtin_memset(vip, 0, sizeof(*vip));
		vip->v4 = hdr->addr;
		*port = hdr->port;
		return 1;
	}
	struct dsr_header6 *hdr6 = &buf->v6;

	if (pkt->l4_off < pkt->l3_off + sizeof(*hdr6) ||
	    ctx_load_bytes(ctx, pkt->l3_off, hdr6, sizeof(*hdr6)) ||
	    hdr6->ip.nexthdr != NEXTHDR_DEST || hdr6->type != DSR_OPT6_TYPE ||
	    hdr6->len != DSR_OPT6_LEN)
		return 0;
	__builtin_memcpy(vip->v6, hdr6->addr, 16);
	*port = hdr6->port;
	return 1;
}

#endif
