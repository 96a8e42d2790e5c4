/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Refusing a flow to a service without backends, as kube-proxy's REJECT rule
 * does, so the client's connect() or recv() fails at once instead of timing
 * out: a TCP reset, or ICMP port unreachable for UDP. And translating ICMP
 * errors a backend sends about a translated flow.
 */
#ifndef PYEBPFLB_BPF_ICMP_H
#define PYEBPFLB_BPF_ICMP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "lib/csum.h"
#include "lib/ct.h"
#include "lib/ctx.h"
#include "lib/events.h"
#include "lib/nat.h"
#include "lib/nodeport.h"
#include "lib/parse.h"

/* linux/icmp.h drags in libc headers, so the few ICMP constants live here. */
#define ICMP_DEST_UNREACH   3
#define ICMP_PORT_UNREACH   3
#define ICMP_TIME_EXCEEDED  11
#define ICMP_PARAMETERPROB  12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG   2
#define ICMPV6_TIME_EXCEED  3
#define ICMPV6_PARAMPROB    4
#define ICMPV6_PORT_UNREACH 4

/* ICMP and ICMPv6 share this header layout. */
struct icmp_header {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u32 unused;
};

static __always_inline int swap_macs(struct ctx_buff *ctx)
{
	__u8 macs[2 * ETH_ALEN], swapped[2 * ETH_ALEN];

	if (ctx_load_bytes(ctx, 0, macs, sizeof(macs)))
		return -1;
	__builtin_memcpy(swapped, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(swapped + ETH_ALEN, macs, ETH_ALEN);
	return ctx_store_bytes(ctx, 0, swapped, sizeof(swapped));
}

/*
 * The quote is the offending IP header and its whole TCP or UDP header
 * (RFC 792 asks for 8 bytes at least, RFC 1812 allows more). Quoting the
 * whole L4 header matters: a packet from a local socket may still carry a
 * partial checksum whose field lies in it, and the kernel will not cut a
 * packet short of that field.
 */
#define QUOTE_MAX 124 /* a multiple of 4: bpf_csum_diff sums whole words */

static __always_inline int quote_len(const struct packet *pkt)
{
	__u32 len = pkt->l4_off - pkt->l3_off + pkt->l4_hlen;

	if (len > QUOTE_MAX || len % 4)
		return -1;
	return len;
}

/* Make room for `hdr_len` bytes of new headers before the old IP header, and
 * keep only the quote after them; the quote is loaded into `quote`. */
static __always_inline int make_room(struct ctx_buff *ctx, __u32 hdr_len, __u32 len,
				     __u8 quote[QUOTE_MAX + 4])
{
	/* A no-op for the lengths quote_len() gives; it tells the verifier the bound. */
	len &= 0x7c;
	if (len < 8)
		return -1;
	if (ctx_grow_after_mac(ctx, hdr_len))
		return -1;
	if (ctx_set_len(ctx, ETH_HLEN + hdr_len + len))
		return -1;
	return ctx_load_bytes(ctx, ETH_HLEN + hdr_len, quote, len);
}

/*
 * Turn the packet into an ICMP error back to its sender, in place: room for
 * the new IP and ICMP headers goes in front of the old IP header, which with
 * its L4 header becomes the quoted part; the payload is cut.
 */
static __always_inline int reject_ipv4(struct ctx_buff *ctx, const struct packet *pkt,
				       __u8 quote[QUOTE_MAX + 4])
{
	struct {
		struct iphdr ip;
		struct icmp_header icmp;
	} hdr = {};
	int len = quote_len(pkt);
	__s64 sum;

	/* Options would put the ports beyond where the quote is read. */
	if (!pkt->l3_hlen_ok || len < 0 || make_room(ctx, sizeof(hdr), len, quote))
		return -1;

	hdr.ip.version = 4;
	hdr.ip.ihl = 5;
	hdr.ip.tot_len = bpf_htons(sizeof(hdr) + len);
	hdr.ip.ttl = 64;
	hdr.ip.protocol = IPPROTO_ICMP;
	hdr.ip.saddr = pkt->daddr.v4;
	hdr.ip.daddr = pkt->saddr.v4;
	hdr.ip.check = csum_fold((__u32)bpf_csum_diff(0, 0, (__u32 *)&hdr.ip, sizeof(hdr.ip), 0));
	hdr.icmp.type = ICMP_DEST_UNREACH;
	hdr.icmp.code = ICMP_PORT_UNREACH;
	sum = bpf_csum_diff(0, 0, (__u32 *)&hdr.icmp, sizeof(hdr.icmp), 0);
	sum = bpf_csum_diff(0, 0, (__u32 *)quote, len & 0x7c, sum);
	hdr.icmp.checksum = csum_fold((__u32)sum);

	if (ctx_store_bytes(ctx, ETH_HLEN, &hdr, sizeof(hdr)))
		return -1;
	return swap_macs(ctx);
}

static __always_inline int reject_ipv6(struct ctx_buff *ctx, const struct packet *pkt,
				       __u8 quote[QUOTE_MAX + 4])
{
	struct {
		struct ipv6hdr ip;
		struct icmp_header icmp;
	} hdr = {};
	struct {
		struct in6_addr saddr;
		struct in6_addr daddr;
		__u32 length;
		__u32 next; /* three zero bytes, then the next header */
	} pseudo = {};
	int len = quote_len(pkt);
	__s64 sum;

	if (len < 0 || make_room(ctx, sizeof(hdr), len, quote))
		return -1;

	hdr.ip.version = 6;
	hdr.ip.payload_len = bpf_htons(sizeof(hdr.icmp) + len);
	hdr.ip.nexthdr = IPPROTO_ICMPV6;
	hdr.ip.hop_limit = 64;
	__builtin_memcpy(&hdr.ip.saddr, pkt->daddr.bytes, 16);
	__builtin_memcpy(&hdr.ip.daddr, pkt->saddr.bytes, 16);
	hdr.icmp.type = ICMPV6_DEST_UNREACH;
	hdr.icmp.code = ICMPV6_PORT_UNREACH;

	/* ICMPv6's checksum covers a pseudo-header of addresses and length (RFC 4443). */
	pseudo.saddr = hdr.ip.saddr;
	pseudo.daddr = hdr.ip.daddr;
	pseudo.length = bpf_htonl(sizeof(hdr.icmp) + len);
	pseudo.next = bpf_htonl(IPPROTO_ICMPV6);
	sum = bpf_csum_diff(0, 0, (__u32 *)&pseudo, sizeof(pseudo), 0);
	sum = bpf_csum_diff(0, 0, (__u32 *)&hdr.icmp, sizeof(hdr.icmp), sum);
	sum = bpf_csum_diff(0, 0, (__u32 *)quote, len & 0x7c, sum);
	hdr.icmp.checksum = csum_fold((__u32)sum);

	if (ctx_store_bytes(ctx, ETH_HLEN, &hdr, sizeof(hdr)))
		return -1;
	return swap_macs(ctx);
}

/*
 * Answer a TCP segment with a reset, in place (RFC 793's rules for a closed
 * port): swapping addresses and ports leaves every checksum as it is, and the
 * other changes go through the incremental helpers, which also keep a partial
 * checksum right. The payload, if any, stays: RFC 1122 lets a reset carry
 * data, and not cutting it keeps the checksum arithmetic incremental.
 *
 * Why not ICMP for TCP too: a client on the same host gets the reset through
 * its socket backlog, while an ICMP error that arrives during connect() is
 * dropped while the socket is locked, leaving the client to its SYN retry.
 */
static __always_inline int reset_tcp(struct ctx_buff *ctx, const struct packet *pkt)
{
	struct tcphdr tcp;
	__u32 old_seq, old_ack, payload;
	__u16 old_word, new_word;
	union pyebpflb_addr addrs[2];
	__u32 addr_len = pkt->family == PYEBPFLB_IPV4 ? 4 : 16;
	__u8 flags;

	if (ctx_load_bytes(ctx, pkt->l4_off, &tcp, sizeof(tcp)))
		return -1;
	old_seq = tcp.seq;
	old_ack = tcp.ack_seq;
	old_word = ((__u16 *)&tcp)[6]; /* data offset and flags */
	flags = pkt->tcp_flags;
	payload = pkt->l3_end - pkt->l4_off - pkt->l4_hlen;
	if (flags & TCP_FLAG_ACK) {
		tcp.seq = tcp.ack_seq;
		((__u8 *)&tcp)[13] = TCP_FLAG_RST;
	} else {
		tcp.ack_seq = bpf_htonl(bpf_ntohl(tcp.seq) + payload + !!(flags & TCP_FLAG_SYN) +
					!!(flags & TCP_FLAG_FIN));
		tcp.seq = 0;
		((__u8 *)&tcp)[13] = TCP_FLAG_RST | TCP_FLAG_ACK;
	}
	new_word = ((__u16 *)&tcp)[6];
	tcp.source = pkt->dport;
	tcp.dest = pkt->sport;

	if (ctx_l4_csum_replace(ctx, pkt->csum_off, old_seq, tcp.seq, sizeof(__u32)) ||
	    ctx_l4_csum_replace(ctx, pkt->csum_off, old_ack, tcp.ack_seq, sizeof(__u32)) ||
	    ctx_l4_csum_replace(ctx, pkt->csum_off, old_word, new_word, sizeof(__u16)))
		return -1;
	/* Ports, sequence numbers and flags: the first 14 bytes of the header. */
	if (ctx_store_bytes(ctx, pkt->l4_off, &tcp, 14))
		return -1;
	addrs[0] = pkt->daddr;
	addrs[1] = pkt->saddr;
	if (ctx_store_bytes(ctx, saddr_off(pkt), &addrs[0], addr_len) ||
	    ctx_store_bytes(ctx, daddr_off(pkt), &addrs[1], addr_len))
		return -1;
	return swap_macs(ctx);
}

/* Refuse a flow and send the refusal back out of the interface it came in on:
 * a reset for TCP, ICMP port unreachable for UDP (kube-proxy's REJECT). */
/* `quote`: room for the quoted headers (QUOTE_MAX + 4 bytes), in the caller's
 * per-CPU scratch slot: the stack has none to spare. */
static __always_inline int reject(struct ctx_buff *ctx, const struct packet *pkt, __u8 *quote)
{
	int err;

	__builtin_memset(quote, 0, QUOTE_MAX + 4);
	if (pkt->proto == IPPROTO_TCP)
		err = reset_tcp(ctx, pkt);
	else if (pkt->family == PYEBPFLB_IPV4)
		err = reject_ipv4(ctx, pkt, quote);
	else
		err = reject_ipv6(ctx, pkt, quote);

	if (err) {
		note_drop(ctx, pkt, PYEBPFLB_POLICY_INGRESS, PYEBPFLB_DROP_REJECT_FAILED, 0, 0);
		return CTX_DROP;
	}
	return ctx_bounce(ctx);
}

static __always_inline int icmp_is_error(const struct packet *pkt)
{
	__u8 type = ((__u8 *)&pkt->sport)[0];

	if (pkt->proto == IPPROTO_ICMP)
		return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED ||
		       type == ICMP_PARAMETERPROB;
	return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG ||
	       type == ICMPV6_TIME_EXCEED || type == ICMPV6_PARAMPROB;
}

/*
 * The flow an ICMP error is about, keyed the way its answers are: the error
 * quotes a packet (src -> dst), `key` gets dst -> src with the ports swapped.
 * 0 when the quote is of a TCP or UDP packet, -1 otherwise.
 */
struct icmp_quote {
	__u32 ip_off; /* the quoted IP header */
	__u32 l4_off; /* the quoted transport header */
};

static __always_inline int icmp_quoted_key(struct ctx_buff *ctx, const struct packet *pkt,
					   struct pyebpflb_ct_key *key, struct icmp_quote *quote)
{
	__u32 inner_off = pkt->l4_off + 8;
	__u16 ports[2];
	__u8 proto;

	__builtin_memset(key, 0, sizeof(*key));
	key->family = pkt->family;
	if (!icmp_is_error(pkt))
		return -1;
	quote->ip_off = inner_off;
	if (pkt->family == PYEBPFLB_IPV4) {
		struct iphdr inner;

		if (ctx_load_bytes(ctx, inner_off, &inner, sizeof(inner)) || inner.ihl < 5)
			return -1;
		proto = inner.protocol;
		key->saddr.v4 = inner.daddr;
		key->daddr.v4 = inner.saddr;
		quote->l4_off = inner_off + inner.ihl * 4;
	} else {
		struct ipv6hdr inner;

		if (ctx_load_bytes(ctx, inner_off, &inner, sizeof(inner)))
			return -1;
		proto = inner.nexthdr;
		__builtin_memcpy(key->saddr.bytes, &inner.daddr, 16);
		__builtin_memcpy(key->daddr.bytes, &inner.saddr, 16);
		quote->l4_off = inner_off + sizeof(inner);
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return -1;
	if (ctx_load_bytes(ctx, quote->l4_off, ports, sizeof(ports)))
		return -1;
	key->proto = proto;
	key->sport = ports[1];
	key->dport = ports[0];
	return 0;
}

/*
 * Rewrite one end of the quoted packet, `from` -> `to` (the address), and its
 * port, keeping the quoted IP header checksum and the ICMP checksum right.
 * `dst` picks the quote's destination or source. The quoted L4 checksum is
 * left as it is: nobody checks it, and only its first 8 bytes are quoted for
 * sure.
 */
static __always_inline int icmp_rewrite_quote(struct ctx_buff *ctx, const struct packet *pkt,
					      const struct icmp_quote *quote, int dst,
					      const union pyebpflb_addr *from,
					      const union pyebpflb_addr *to, __u16 from_port,
					      __u16 to_port)
{
	__u32 csum_off = pkt->csum_off;

	if (pkt->family == PYEBPFLB_IPV4) {
		__u32 addr_off = quote->ip_off + (dst ? offsetof(struct iphdr, daddr)
						      : offsetof(struct iphdr, saddr));
		__u32 inner_csum_off = quote->ip_off + offsetof(struct iphdr, check);
		__u16 old_csum, new_csum;

		if (ctx_load_bytes(ctx, inner_csum_off, &old_csum, sizeof(old_csum)) ||
		    ctx_l3_csum_replace(ctx, inner_csum_off, from->v4, to->v4, sizeof(__u32)) ||
		    ctx_load_bytes(ctx, inner_csum_off, &new_csum, sizeof(new_csum)) ||
		    ctx_l4_csum_replace(ctx, csum_off, old_csum, new_csum, sizeof(__u16)) ||
		    ctx_l4_csum_replace(ctx, csum_off, from->v4, to->v4, sizeof(__u32)) ||
		    ctx_store_bytes(ctx, addr_off, &to->v4, sizeof(__u32)))
			return -1;
	} else {
		__u32 addr_off = quote->ip_off + (dst ? offsetof(struct ipv6hdr, daddr)
						      : offsetof(struct ipv6hdr, saddr));
		__s64 diff = bpf_csum_diff((__u32 *)from->v6, 16, (__u32 *)to->v6, 16, 0);

		if (ctx_l4_csum_replace(ctx, csum_off, 0, diff, 0) ||
		    ctx_store_bytes(ctx, addr_off, to->bytes, 16))
			return -1;
	}
	if (ctx_l4_csum_replace(ctx, csum_off, from_port, to_port, sizeof(__u16)) ||
	    ctx_store_bytes(ctx, quote->l4_off + (dst ? 2 : 0), &to_port, sizeof(__u16)))
		return -1;
	return 0;
}

/*
 * An ICMP error leaving towards a client quotes the packet the backend got
 * (client -> backend:port). The client's socket knows that flow as
 * client -> VIP:port, so the quote's destination, the error's source (when
 * the backend itself sent it) and the checksums are rewritten to match.
 * 1 when the error was about a translated flow (and is translated now), 0
 * when not, -1 when rewriting failed.
 */
static __always_inline int icmp_error_rev_nat(struct ctx_buff *ctx, const struct packet *pkt,
					      const struct pyebpflb_lb_config *cfg, __u64 now)
{
	struct pyebpflb_ct_entry *entry, *flow;
	struct pyebpflb_ct_key key;
	struct icmp_quote quote;
	struct ct_place place;
	union pyebpflb_addr vip;
	__u16 vip_port;

	if (icmp_quoted_key(ctx, pkt, &key, &quote))
		return 0;
	key.dir = PYEBPFLB_CT_REPLY;
	entry = ct_lookup_reply(&key, pkt, cfg, now, &flow, &place);
	if (!entry)
		return 0;
	vip = entry->nat_addr; /* copied: the entry may be reused under us */
	vip_port = entry->nat_port;
	if (icmp_rewrite_quote(ctx, pkt, &quote, 1, &key.saddr, &vip, key.sport, vip_port))
		return -1;
	/* The error's own source, if the backend sent it (a router on the way keeps its own). */
	if (addr_equal(&pkt->saddr, &key.saddr) &&
	    rewrite_addr(ctx, pkt, saddr_off(pkt), &pkt->saddr, &vip, pkt->family == PYEBPFLB_IPV6))
		return -1;
	return 1;
}

/* icmp_error_dnat translated an error for a SNAT or DSR flow (its backend is on
 * another node): it now comes from this node (w->to) to the backend
 * (w->backend.addr), to be sent out by the FIB. */
#define ICMP_RELAYED 2

/*
 * An ICMP error arriving for a VIP: a router between the client and the load
 * balancer could not deliver a packet the backend sent through the VIP
 * (fragmentation needed, packet too big, unreachable, time exceeded). It
 * quotes that packet as it left the load balancer (VIP:port -> client), so
 * it is about the flow whose SERVICE key is the quote reversed. Sent on to
 * the backend: the error's destination and the quote's source become the
 * backend's, so its TCP stack finds the connection and learns the path MTU.
 * 1 when translated, 0 when the error is about no translated flow, -1 when
 * rewriting failed.
 */
static __always_inline int icmp_error_dnat(struct ctx_buff *ctx, const struct packet *pkt,
					   struct snat_work *w,
					   const struct pyebpflb_lb_config *cfg, __u64 now)
{
	struct pyebpflb_ct_entry *entry;
	struct pyebpflb_snat_entry *mapped;
	struct pyebpflb_ct_key *key = &w->key;
	struct icmp_quote quote;
	struct ct_place place;
	union pyebpflb_addr *backend = &w->backend.addr;
	__u16 backend_port;
	__u8 flags;

	if (icmp_quoted_key(ctx, pkt, key, &quote) || !addr_equal(&pkt->daddr, &key->daddr))
		return 0;
	key->dir = PYEBPFLB_CT_SERVICE;
	entry = ct_lookup_service(key, pkt, cfg, now, &place);
	if (!entry)
		return 0;
	*backend = entry->nat_addr; /* copied: the entry may be reused under us */
	backend_port = entry->nat_port;
	flags = entry->flags;
	if (icmp_rewrite_quote(ctx, pkt, &quote, 0, &key->daddr, backend, key->dport, backend_port))
		return -1;
	/* A SNAT flow: the backend knows its client as this node's address and port,
	 * and the error comes from this node, which relays it (the router that sent
	 * it would drop a packet with its own address as the source). */
	if (flags & PYEBPFLB_CT_SNAT) {
		snat_key(&w->out_key, &key->saddr, key->sport, backend, backend_port, pkt,
			 PYEBPFLB_SNAT_OUT);
		w->out_key.proto = key->proto; /* the quoted packet's, not the ICMP error's */
		mapped = bpf_map_lookup_elem(&lb_snat, &w->out_key);
		if (!mapped)
			return -1;
		w->to = mapped->addr;
		if (icmp_rewrite_quote(ctx, pkt, &quote, 1, &key->saddr, &w->to, key->sport,
				       mapped->port))
			return -1;
	} else if (flags & PYEBPFLB_CT_DSR) {
		snat_source(&w->to, pkt); /* the backend's answers went around: relayed too */
	}
	if ((flags & (PYEBPFLB_CT_SNAT | PYEBPFLB_CT_DSR)) &&
	    rewrite_addr(ctx, pkt, saddr_off(pkt), &pkt->saddr, &w->to,
			 pkt->family == PYEBPFLB_IPV6))
		return -1;
	if (rewrite_addr(ctx, pkt, daddr_off(pkt), &pkt->daddr, backend,
			 pkt->family == PYEBPFLB_IPV6))
		return -1;
	return flags & (PYEBPFLB_CT_SNAT | PYEBPFLB_CT_DSR) ? ICMP_RELAYED : 1;
}

/*
 * An ICMP error about a packet this node SNATed towards a remote backend (a
 * router on the way, or the backend's node, could not deliver node:port ->
 * backend): it quotes that packet, so the mapping's answer half (backend ->
 * node:port) names the client, and the flow's reply entry the frontend the
 * client called. The quote becomes client -> frontend, the error goes to the
 * client from the frontend (this node relays it: the router that sent it
 * would drop a packet with its own address as the source); the caller sends
 * it out (w->vip to w->client). 1 when translated, 0 when it is about no
 * mapping, -1 on failure.
 */
static __always_inline int icmp_error_snat(struct ctx_buff *ctx, const struct packet *pkt,
					   struct snat_work *w,
					   const struct pyebpflb_lb_config *cfg, __u64 now)
{
	struct pyebpflb_ct_key *key = &w->key;
	struct pyebpflb_ct_entry *reply, *flow;
	struct pyebpflb_snat_entry *mapped;
	struct icmp_quote quote;
	struct ct_place place;
	__u16 client_port, vip_port;

	if (icmp_quoted_key(ctx, pkt, key, &quote) || !addr_equal(&pkt->daddr, &key->daddr))
		return 0;
	key->dir = PYEBPFLB_SNAT_IN; /* the key is backend -> node:port, as the mapping's */
	mapped = bpf_map_lookup_elem(&lb_snat, key);
	if (!mapped)
		return 0;
	w->client = mapped->addr;
	client_port = mapped->port;
	/* The flow as its backend's answers are keyed: backend -> client. */
	w->in_key = *key;
	w->in_key.daddr = w->client;
	w->in_key.dport = client_port;
	w->in_key.dir = PYEBPFLB_CT_REPLY;
	reply = ct_lookup_reply(&w->in_key, pkt, cfg, now, &flow, &place);
	if (!reply)
		return 0;
	w->vip = reply->nat_addr;
	vip_port = reply->nat_port;
	if (icmp_rewrite_quote(ctx, pkt, &quote, 1, &key->saddr, &w->vip, key->sport, vip_port) ||
	    icmp_rewrite_quote(ctx, pkt, &quote, 0, &key->daddr, &w->client, key->dport,
			       client_port))
		return -1;
	if (rewrite_addr(ctx, pkt, saddr_off(pkt), &pkt->saddr, &w->vip,
			 pkt->family == PYEBPFLB_IPV6))
		return -1;
	if (rewrite_addr(ctx, pkt, daddr_off(pkt), &pkt->daddr, &w->client,
			 pkt->family == PYEBPFLB_IPV6))
		return -1;
	return 1;
}

#endif
