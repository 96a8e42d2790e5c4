/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Header parsing into one flat description of the packet. Reads go through
 * load_header: direct loads where the bytes are in the packet's linear part,
 * bpf_skb_load_bytes (which also reaches paged data) otherwise.
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

#define IPV4_FRAG_MASK	     0x3fff /* more-fragments flag and fragment offset */
#define IPV6_MAX_EXT_HEADERS 6

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif

enum parse_result {
	PARSE_OK = 0,	     /* TCP, UDP, ICMP or ICMPv6 with its ports/type known */
	PARSE_NOT_OURS = 1,  /* not IP, another protocol, or a fragment: pass untouched */
	PARSE_MALFORMED = 2, /* lengths that do not add up: pass untouched */
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
	__u32 l3_off;
	__u32 l4_off;
	__u32 csum_off; /* the L4 checksum field */
	__u32 l3_end;	/* end of the IP datagram (Ethernet padding excluded) */
	__u32 l4_hlen;	/* TCP or UDP header length */
};

/*
 * Copy `len` header bytes at `off`: straight from the packet when they are in
 * its linear part (a few loads), through bpf_skb_load_bytes otherwise (a
 * helper call, which also reaches paged data). `len` is a constant at every
 * call site; the bound on `off` is what lets the verifier check the access.
 */
static __always_inline int load_header(struct __sk_buff *skb, __u32 off, void *dst, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	void *at;

	if (off <= 512) {
		at = data + off;
		if (at + len <= end) {
			__builtin_memcpy(dst, at, len);
			return 0;
		}
	}
	return bpf_skb_load_bytes(skb, off, dst, len);
}

static __always_inline int addr_equal(const union pyebpflb_addr *a, const union pyebpflb_addr *b)
{
	return a->v6[0] == b->v6[0] && a->v6[1] == b->v6[1] && a->v6[2] == b->v6[2] &&
	       a->v6[3] == b->v6[3];
}

static __always_inline int parse_l4(struct __sk_buff *skb, struct packet *pkt)
{
	if (pkt->proto == IPPROTO_TCP) {
		struct tcphdr tcp;

		if (pkt->l4_off + sizeof(tcp) > pkt->l3_end ||
		    load_header(skb, pkt->l4_off, &tcp, sizeof(tcp)))
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
		    load_header(skb, pkt->l4_off, &udp, sizeof(udp)))
			return PARSE_MALFORMED;
		if (bpf_ntohs(udp.len) < sizeof(udp) ||
		    pkt->l4_off + bpf_ntohs(udp.len) > pkt->l3_end)
			return PARSE_MALFORMED;
		pkt->sport = udp.source;
		pkt->dport = udp.dest;
		pkt->l4_hlen = sizeof(udp);
		pkt->csum_off = pkt->l4_off + offsetof(struct udphdr, check);
		return PARSE_OK;
	}
	if (pkt->proto == IPPROTO_ICMP || pkt->proto == IPPROTO_ICMPV6) {
		__u16 type_code;

		/* An ICMP header is 8 bytes; its checksum follows type and code. */
		if (pkt->l4_off + 8 > pkt->l3_end ||
		    load_header(skb, pkt->l4_off, &type_code, sizeof(type_code)))
			return PARSE_MALFORMED;
		pkt->sport = type_code;
		pkt->dport = 0;
		pkt->csum_off = pkt->l4_off + 2;
		return PARSE_OK;
	}
	return PARSE_NOT_OURS;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct packet *pkt)
{
	struct iphdr ip;
	__u32 hlen, total;

	if (load_header(skb, pkt->l3_off, &ip, sizeof(ip)))
		return PARSE_MALFORMED;
	if (ip.version != 4 || ip.ihl < 5)
		return PARSE_MALFORMED;
	hlen = ip.ihl * 4;
	total = bpf_ntohs(ip.tot_len);
	if (total < hlen || pkt->l3_off + total > skb->len)
		return PARSE_MALFORMED;
	/* Only the first fragment carries ports: fragments are not translated. */
	if (ip.frag_off & bpf_htons(IPV4_FRAG_MASK))
		return PARSE_NOT_OURS;
	pkt->family = PYEBPFLB_IPV4;
	pkt->proto = ip.protocol;
	pkt->saddr.v4 = ip.saddr;
	pkt->daddr.v4 = ip.daddr;
	pkt->l3_hlen_ok = hlen == sizeof(ip);
	pkt->l4_off = pkt->l3_off + hlen;
	pkt->l3_end = pkt->l3_off + total;
	return parse_l4(skb, pkt);
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct packet *pkt)
{
	struct ipv6hdr ip;
	__u32 off, payload;
	__u8 next;

	if (load_header(skb, pkt->l3_off, &ip, sizeof(ip)))
		return PARSE_MALFORMED;
	if (ip.version != 6)
		return PARSE_MALFORMED;
	payload = bpf_ntohs(ip.payload_len);
	/* A zero payload length means a jumbogram; those are not ours. */
	if (payload == 0)
		return PARSE_NOT_OURS;
	if (pkt->l3_off + sizeof(ip) + payload > skb->len)
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
		__u8 ext[2]; /* next header, length */

		if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS &&
		    next != IPPROTO_FRAGMENT && next != IPPROTO_AH)
			break;
		if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)))
			return PARSE_MALFORMED;
		if (next == IPPROTO_FRAGMENT)
			return PARSE_NOT_OURS;
		/* AH counts its length in 4-byte units minus 2, the others in 8-byte units minus 1.
		 */
		off += next == IPPROTO_AH ? (ext[1] + 2) * 4 : (ext[1] + 1) * 8;
		next = ext[0];
		if (off > pkt->l3_end)
			return PARSE_MALFORMED;
	}
	pkt->proto = next;
	pkt->l4_off = off;
	return parse_l4(skb, pkt);
}

static __always_inline int parse_packet(struct __sk_buff *skb, struct packet *pkt)
{
	__builtin_memset(pkt, 0, sizeof(*pkt));
	pkt->l3_off = ETH_HLEN;
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return parse_ipv4(skb, pkt);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(skb, pkt);
	return PARSE_NOT_OURS;
}

#endif
