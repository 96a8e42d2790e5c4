/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Header parsing into one flat description of the packet. Reads go through
 * load_header: direct loads where the bytes are in the packet's linear part,
 * ctx_load_bytes (which also reaches paged data) otherwise.
 */
#ifndef PYEBPFLB_BPF_PARSE_H
#define PYEBPFLB_BPF_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/ctx.h"

#define IPV4_FRAG_MASK	       0x3fff /* more-fragments flag and fragment offset */
#define IPV4_FRAG_OFFSET       0x1fff
#define IPV6_FRAG_OFFSET       0xfff8
#define IPV6_MAX_EXT_HEADERS   6
#define SCTP_COMMON_HEADER_LEN 12 /* ports, verification tag, checksum */

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif

/*
 * The load balancer translates PARSE_OK packets only and passes the others
 * untouched; policy (lib/policy.h) decides on all of them.
 */
enum parse_result {
	PARSE_OK = 0,	       /* TCP, UDP, ICMP or ICMPv6 with its ports/type known */
	PARSE_NOT_OURS = 1,    /* not IP */
	PARSE_MALFORMED = 2,   /* lengths that do not add up */
	PARSE_FRAGMENT = 3,    /* addresses and protocol known; ports in a first fragment */
	PARSE_OTHER = 4,       /* another IP protocol: addresses and protocol known */
	PARSE_UNSUPPORTED = 5, /* IP, but its transport header was not found */
};

enum fragment_kind {
	FRAG_NONE = 0,
	FRAG_FIRST = 1, /* offset 0, more to come: carries the transport header */
	FRAG_LATER = 2, /* no transport header */
};

struct packet {
	union pyebpflb_addr saddr;
	union pyebpflb_addr daddr;
	__u16 sport; /* network order; ICMP: type and code */
	__u16 dport;
	__u8 family;
	__u8 proto;
	__u8 tcp_flags;
	__u8 l3_hlen_ok; /* IPv4: header without options */
	__u8 frag;	 /* enum fragment_kind */
	__u8 dry;	 /* explain: decide, write nothing (see lb.bpf.c) */
	__u8 _pad;
	__u16 icmp_id; /* ICMP echo identifier */
	__u16 _pad2;
	__u32 frag_id;
	__u32 l3_off;
	__u32 l4_off;
	__u32 csum_off; /* the L4 checksum field */
	__u32 l3_end;	/* end of the IP datagram (Ethernet padding excluded) */
	__u32 l4_hlen;	/* TCP or UDP header length */
};

/*
 * Copy `len` header bytes at `off`: straight from the packet when they are in
 * its linear part (a few loads), through ctx_load_bytes otherwise (a
 * helper call, which also reaches paged data). `len` is a constant at every
 * call site; the bound on `off` is what lets the verifier check the access.
 */
static __always_inline int load_header(struct ctx_buff *ctx, __u32 off, void *dst, __u32 len)
{
	void *data = ctx_data(ctx);
	void *end = ctx_data_end(ctx);
	void *at;

	if (off <= 512) {
		at = data + off;
		if (at + len <= end) {
			__builtin_memcpy(dst, at, len);
			return 0;
		}
	}
	return ctx_load_bytes(ctx, off, dst, len);
}

static __always_inline int addr_equal(const union pyebpflb_addr *a, const union pyebpflb_addr *b)
{
	return a->v6[0] == b->v6[0] && a->v6[1] == b->v6[1] && a->v6[2] == b->v6[2] &&
	       a->v6[3] == b->v6[3];
}

static __always_inline int parse_l4(struct ctx_buff *ctx, struct packet *pkt)
{
	if (pkt->proto == IPPROTO_TCP) {
		struct tcphdr tcp;

		if (pkt->l4_off + sizeof(tcp) > pkt->l3_end ||
		    load_header(ctx, pkt->l4_off, &tcp, sizeof(tcp)))
			return PARSE_MALFORMED;
		if (tcp.doff < 5 || pkt->l4_off + tcp.doff * 4 > pkt->l3_end)
			return PARSE_MALFORMED;
		pkt->sport = tcp.source;
		pkt->dport = tcp.dest;
		pkt->tcp_flags = ((__u8 *)&tcp)[13];
		pkt->l4_hlen = tcp.doff * 4;
		pkt->csum_off = pkt->l4_off + offsetof(struct tcphdr, check);
		return PARSE_OK;
	}
	if (pkt->proto == IPPROTO_UDP) {
		struct udphdr udp;

		if (pkt->l4_off + sizeof(udp) > pkt->l3_end ||
		    load_header(ctx, pkt->l4_off, &udp, sizeof(udp)))
			return PARSE_MALFORMED;
		/* A first fragment holds only the start of the datagram. */
		if (bpf_ntohs(udp.len) < sizeof(udp) ||
		    (!pkt->frag && pkt->l4_off + bpf_ntohs(udp.len) > pkt->l3_end))
			return PARSE_MALFORMED;
		pkt->sport = udp.source;
		pkt->dport = udp.dest;
		pkt->l4_hlen = sizeof(udp);
		pkt->csum_off = pkt->l4_off + offsetof(struct udphdr, check);
		return PARSE_OK;
	}
	if (pkt->proto == IPPROTO_ICMP || pkt->proto == IPPROTO_ICMPV6) {
		__u16 head[3]; /* type and code, checksum, echo identifier */

		/* An ICMP header is 8 bytes; its checksum follows type and code. */
		if (pkt->l4_off + 8 > pkt->l3_end ||
		    load_header(ctx, pkt->l4_off, head, sizeof(head)))
			return PARSE_MALFORMED;
		pkt->sport = head[0];
		pkt->icmp_id = head[2];
		pkt->dport = 0;
		pkt->csum_off = pkt->l4_off + 2;
		return PARSE_OK;
	}
	if (pkt->proto == IPPROTO_SCTP) {
		__be16 ports[2];

		/* Only policy reads SCTP's ports (its common header's first four bytes):
		 * nothing balances or translates it, so it stays PARSE_OTHER. */
		if (pkt->l4_off + SCTP_COMMON_HEADER_LEN > pkt->l3_end ||
		    load_header(ctx, pkt->l4_off, ports, sizeof(ports)))
			return PARSE_MALFORMED;
		pkt->sport = ports[0];
		pkt->dport = ports[1];
	}
	return PARSE_OTHER;
}

/* After the IP header: a fragment reports its kind, a whole packet its transport. */
static __always_inline int parse_transport(struct ctx_buff *ctx, struct packet *pkt)
{
	int result;

	if (pkt->frag == FRAG_LATER)
		return PARSE_FRAGMENT;
	result = parse_l4(ctx, pkt);
	if (pkt->frag == FRAG_FIRST && (result == PARSE_OK || result == PARSE_OTHER))
		return PARSE_FRAGMENT;
	return result;
}

static __always_inline int parse_ipv4(struct ctx_buff *ctx, struct packet *pkt)
{
	struct iphdr ip;
	__u32 hlen, total;

	if (load_header(ctx, pkt->l3_off, &ip, sizeof(ip)))
		return PARSE_MALFORMED;
	if (ip.version != 4 || ip.ihl < 5)
		return PARSE_MALFORMED;
	hlen = ip.ihl * 4;
	total = bpf_ntohs(ip.tot_len);
	/* BIG TCP (Linux 6.3): a GSO packet over 64 KiB has no length of its own. */
	if (total == 0 && ctx_len(ctx) - pkt->l3_off > 0xffff)
		total = ctx_len(ctx) - pkt->l3_off;
	if (total < hlen || pkt->l3_off + total > ctx_len(ctx))
		return PARSE_MALFORMED;
	/* Only the first fragment carries ports: fragments are not translated. */
	if (ip.frag_off & bpf_htons(IPV4_FRAG_MASK)) {
		pkt->frag = ip.frag_off & bpf_htons(IPV4_FRAG_OFFSET) ? FRAG_LATER : FRAG_FIRST;
		pkt->frag_id = ip.id;
	}
	pkt->family = PYEBPFLB_IPV4;
	pkt->proto = ip.protocol;
	pkt->saddr.v4 = ip.saddr;
	pkt->daddr.v4 = ip.daddr;
	pkt->l3_hlen_ok = hlen == sizeof(ip);
	pkt->l4_off = pkt->l3_off + hlen;
	pkt->l3_end = pkt->l3_off + total;
	return parse_transport(ctx, pkt);
}

static __always_inline int ipv6_is_extension(__u8 next)
{
	return next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
	       next == IPPROTO_FRAGMENT || next == IPPROTO_AH;
}

static __always_inline int parse_ipv6(struct ctx_buff *ctx, struct packet *pkt)
{
	struct ipv6hdr ip;
	__u32 off, payload;
	__u8 next;

	if (load_header(ctx, pkt->l3_off, &ip, sizeof(ip)))
		return PARSE_MALFORMED;
	if (ip.version != 6)
		return PARSE_MALFORMED;
	payload = bpf_ntohs(ip.payload_len);
	/*
	 * A zero payload length: a packet over 64 KiB, a BIG TCP GSO packet
	 * (Linux 5.19, its hop-by-hop jumbo option already stripped) or a
	 * jumbogram (RFC 2675, with the option, which is skipped as any
	 * hop-by-hop header): it runs to the end of the frame. Below 64 KiB a
	 * zero length is malformed.
	 */
	if (payload == 0) {
		if (ctx_len(ctx) - pkt->l3_off - sizeof(ip) <= 0xffff)
			return PARSE_UNSUPPORTED;
		payload = ctx_len(ctx) - pkt->l3_off - sizeof(ip);
	}
	if (pkt->l3_off + sizeof(ip) + payload > ctx_len(ctx))
		return PARSE_MALFORMED;
	pkt->family = PYEBPFLB_IPV6;
	__builtin_memcpy(pkt->saddr.bytes, &ip.saddr, 16);
	__builtin_memcpy(pkt->daddr.bytes, &ip.daddr, 16);
	pkt->l3_hlen_ok = 1;
	pkt->l3_end = pkt->l3_off + sizeof(ip) + payload;
	off = pkt->l3_off + sizeof(ip);
	next = ip.nexthdr;

#pragma unroll
	for (int i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
		/* next header, length; a fragment header: next, 0, offset and flags, id */
		__u8 ext[8];

		if (!ipv6_is_extension(next))
			break;
		if (off + sizeof(ext) > pkt->l3_end || ctx_load_bytes(ctx, off, ext, sizeof(ext)))
			return PARSE_MALFORMED;
		if (next == IPPROTO_FRAGMENT) {
			if (pkt->frag)
				return PARSE_MALFORMED; /* two fragment headers */
			pkt->frag = *(__u16 *)&ext[2] & bpf_htons(IPV6_FRAG_OFFSET) ? FRAG_LATER
										    : FRAG_FIRST;
			pkt->frag_id = *(__u32 *)&ext[4];
			off += 8;
		} else {
			/* AH counts its length in 4-byte units minus 2, the others in
			 * 8-byte units minus 1. */
			off += next == IPPROTO_AH ? (ext[1] + 2) * 4 : (ext[1] + 1) * 8;
		}
		next = ext[0];
		if (off > pkt->l3_end)
			return PARSE_MALFORMED;
		if (pkt->frag == FRAG_LATER)
			break;
	}
	pkt->proto = next;
	pkt->l4_off = off;
	/* Still an extension header after the most we follow: the transport is not found. */
	if (pkt->frag != FRAG_LATER && ipv6_is_extension(next))
		return PARSE_UNSUPPORTED;
	return parse_transport(ctx, pkt);
}

static __always_inline int parse_packet(struct ctx_buff *ctx, struct packet *pkt)
{
	__builtin_memset(pkt, 0, sizeof(*pkt));
	pkt->l3_off = ETH_HLEN;
	if (ctx_protocol(ctx) == bpf_htons(ETH_P_IP))
		return parse_ipv4(ctx, pkt);
	if (ctx_protocol(ctx) == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(ctx, pkt);
	return PARSE_NOT_OURS;
}

#endif
