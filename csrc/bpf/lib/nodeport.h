/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * North-south traffic (Cilium's bpf/lib/nodeport.h): what NodePort,
 * external-IP and load-balancer frontends need beyond a ClusterIP's DNAT.
 *
 * - Source ranges: a load-balancer frontend with loadBalancerSourceRanges
 *   takes new flows only from clients in lb_src_ranges, checked before the
 *   service is balanced and apart from network policy.
 * - SNAT: external traffic to a backend on another node leaves with this
 *   node's address as its source and a port of its own, so the backend's
 *   answer comes back here to be translated. The mapping is kept in lb_snat
 *   both ways. It keeps the client's own port where that is free (no mapping
 *   and no socket of the node holds the tuple towards the backend), as
 *   conntrack's NAT does; else a random port of lb_config's range (above the
 *   node's ephemeral ports), retried on collision.
 * - Forwarding: a packet whose source became this node's address cannot be
 *   handed to the stack (it would be dropped as a martian); it is sent back
 *   out by a FIB lookup and a redirect, as Cilium's fib_redirect.
 */
#ifndef PYEBPFLB_BPF_NODEPORT_H
#define PYEBPFLB_BPF_NODEPORT_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/ct.h"
#include "lib/ctx.h"
#include "lib/node.h"
#include "lib/parse.h"

#define SNAT_RETRIES	       16
#define SNAT_DEFAULT_PORT_MIN  61000 /* above Linux's ephemeral ports (32768-60999) */
#define SNAT_DEFAULT_PORT_MAX  65535
#define SNAT_TOUCH_INTERVAL_NS 1000000000ull /* refresh a mapping at most once a second */

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct pyebpflb_ct_key);
	__type(value, struct pyebpflb_snat_entry);
} lb_snat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pyebpflb_src_range_key);
	__type(value, __u32);
} lb_src_ranges SEC(".maps");

/* User space only: read back as a Service's NodePort, external and LB IPs. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pyebpflb_frontend);
} lb_frontends SEC(".maps");

/* What making a mapping and forwarding work with: in the caller's per-CPU
 * scratch slot, as the stack (512 bytes for all of the program) has no room. */
struct snat_work {
	struct pyebpflb_ct_key out_key;
	struct pyebpflb_ct_key in_key;
	struct pyebpflb_snat_entry out;
	struct pyebpflb_snat_entry in;
	struct bpf_sock_tuple tuple;
	struct bpf_fib_lookup fib;
	/* The SNAT and DSR steps' own values (lib/balance.h). */
	struct pyebpflb_ct_key key;
	struct pyebpflb_backend backend;
	union pyebpflb_addr to;
	union pyebpflb_addr client;
	union pyebpflb_addr vip;
	__u32 service_id;
};

/* May this client open a flow to the load-balancer frontend `service_id`? */
static __always_inline int source_allowed(__u32 service_id, const struct packet *pkt)
{
	struct pyebpflb_src_range_key key = {
	    .prefixlen = PYEBPFLB_SRC_RANGE_FIXED_BITS + (pkt->family == PYEBPFLB_IPV4 ? 32 : 128),
	    .service_id = service_id,
	    .family = pkt->family,
	    .addr = pkt->saddr,
	};

	return bpf_map_lookup_elem(&lb_src_ranges, &key) != NULL;
}

static __always_inline void snat_key(struct pyebpflb_ct_key *key, const union pyebpflb_addr *saddr,
				     __u16 sport, const union pyebpflb_addr *daddr, __u16 dport,
				     const struct packet *pkt, __u8 dir)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->saddr = *saddr;
	key->daddr = *daddr;
	key->sport = sport;
	key->dport = dport;
	key->proto = pkt->proto;
	key->family = pkt->family;
	key->dir = dir;
}

/* A packet used this half of a mapping: refreshed (at most once a second), and
 * closing once it carries a FIN or RST. */
static __always_inline void snat_touch(struct pyebpflb_snat_entry *entry, const struct packet *pkt,
				       __u64 now)
{
	if (pkt->dry)
		return;
	if (now - entry->last_seen_ns > SNAT_TOUCH_INTERVAL_NS)
		entry->last_seen_ns = now;
	if (pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) &&
	    !(entry->flags & PYEBPFLB_SNAT_CLOSING))
		entry->flags |= PYEBPFLB_SNAT_CLOSING;
}

static __always_inline __u64 snat_lifetime(const struct pyebpflb_lb_config *cfg,
					   const struct pyebpflb_snat_entry *entry, __u8 proto)
{
	__u64 lifetime = proto == IPPROTO_TCP ? cfg->snat_tcp_ns : cfg->snat_udp_ns;

	if (proto == IPPROTO_TCP && (entry->flags & PYEBPFLB_SNAT_CLOSING))
		return cfg->ct_tcp_closing_ns;
	return lifetime ? lifetime : cfg->ct_tcp_established_ns;
}

/* Does a socket of the node hold the tuple an answer to `port` would have
 * (backend:port -> to:candidate)? Then the port is not the mapping's to take. */
static __always_inline int snat_port_in_use(struct ctx_buff *ctx, const struct packet *pkt,
					    struct bpf_sock_tuple *tuple,
					    const union pyebpflb_addr *backend, __u16 port,
					    const union pyebpflb_addr *to, __u16 candidate)
{
#ifndef PYEBPFLB_CTX_SOCK
	__u32 size = sizeof(tuple->ipv4);
	struct bpf_sock *sk;

	__builtin_memset(tuple, 0, sizeof(*tuple));
	if (pkt->family == PYEBPFLB_IPV4) {
		tuple->ipv4.saddr = backend->v4;
		tuple->ipv4.daddr = to->v4;
		tuple->ipv4.sport = port;
		tuple->ipv4.dport = candidate;
	} else {
		__builtin_memcpy(tuple->ipv6.saddr, backend->v6, 16);
		__builtin_memcpy(tuple->ipv6.daddr, to->v6, 16);
		tuple->ipv6.sport = port;
		tuple->ipv6.dport = candidate;
		size = sizeof(tuple->ipv6);
	}
	if (pkt->proto == IPPROTO_TCP)
		sk =
		    (struct bpf_sock *)bpf_skc_lookup_tcp(ctx, tuple, size, BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_sk_lookup_udp(ctx, tuple, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
#else
	return 0;
#endif
}

/* The address external flows to remote backends leave with: the node's (its
 * Node.addresses), else the address the client reached (a NodePort's). */
static __always_inline void snat_source(union pyebpflb_addr *to, const struct packet *pkt)
{
	struct pyebpflb_node *self = node();
	const union pyebpflb_addr *own = NULL;

	if (self)
		own = pkt->family == PYEBPFLB_IPV4 ? &self->v4 : &self->v6;
	if (own && (own->v6[0] | own->v6[1] | own->v6[2] | own->v6[3]))
		*to = *own;
	else
		*to = pkt->daddr;
}

/* Can an IN mapping found in the way of a new one be taken? Only when it has
 * been idle past its lifetime (the collector has not come by yet). */
static __always_inline int snat_stale(const struct pyebpflb_snat_entry *entry,
				      const struct pyebpflb_lb_config *cfg, __u8 proto, __u64 now)
{
	return now - entry->last_seen_ns > snat_lifetime(cfg, entry, proto);
}

/*
 * The source a packet of an external flow to a remote backend leaves with
 * (`to`, `to_port`), the flow having been translated to `backend`:`port`: its
 * mapping, made now if it has none. 0, or -1 when no port is free.
 */
static __always_inline int snat_mapping(struct ctx_buff *ctx, const struct packet *pkt,
					struct snat_work *w, const union pyebpflb_addr *backend,
					__u16 port, const struct pyebpflb_lb_config *cfg, __u64 now,
					union pyebpflb_addr *to, __u16 *to_port)
{
	__u32 low = cfg->snat_port_min, high = cfg->snat_port_max, candidate;
	struct pyebpflb_snat_entry *found;

	snat_key(&w->out_key, &pkt->saddr, pkt->sport, backend, port, pkt, PYEBPFLB_SNAT_OUT);
	found = bpf_map_lookup_elem(&lb_snat, &w->out_key);
	if (found) {
		*to = found->addr;
		*to_port = found->port;
		snat_touch(found, pkt, now);
		return 0;
	}
	if (!low || high < low) {
		low = SNAT_DEFAULT_PORT_MIN;
		high = SNAT_DEFAULT_PORT_MAX;
	}
	snat_source(to, pkt);
	candidate = bpf_ntohs(pkt->sport); /* the client's port first */
	__builtin_memset(&w->in, 0, sizeof(w->in));
	w->in.addr = pkt->saddr;
	w->in.port = pkt->sport;
	w->in.created_ns = w->in.last_seen_ns = now;
	/* A loop, not 16 copies of its body (each with stack slots of its own). */
#pragma clang loop unroll(disable)
	for (int i = 0; i < SNAT_RETRIES; i++) {
		snat_key(&w->in_key, backend, port, to, bpf_htons(candidate), pkt,
			 PYEBPFLB_SNAT_IN);
		if (pkt->dry) {
			*to_port = bpf_htons(candidate);
			return 0;
		}
		if (snat_port_in_use(ctx, pkt, &w->tuple, backend, port, to, bpf_htons(candidate)))
			goto next;
		if (!bpf_map_update_elem(&lb_snat, &w->in_key, &w->in, BPF_NOEXIST))
			goto taken;
		found = bpf_map_lookup_elem(&lb_snat, &w->in_key);
		if (found && snat_stale(found, cfg, pkt->proto, now)) {
			/* The idle mapping goes, both halves; not while its other half is
			 * in use (one-way traffic refreshes one half only). */
			snat_key(&w->out_key, &found->addr, found->port, backend, port, pkt,
				 PYEBPFLB_SNAT_OUT);
			found = bpf_map_lookup_elem(&lb_snat, &w->out_key);
			if (found && !snat_stale(found, cfg, pkt->proto, now))
				goto next;
			bpf_map_delete_elem(&lb_snat, &w->out_key);
			snat_key(&w->out_key, &pkt->saddr, pkt->sport, backend, port, pkt,
				 PYEBPFLB_SNAT_OUT);
			if (!bpf_map_update_elem(&lb_snat, &w->in_key, &w->in, BPF_EXIST))
				goto taken;
		}
	next:
		candidate = low + bpf_get_prandom_u32() % (high - low + 1);
	}
	return -1;
taken:
	__builtin_memset(&w->out, 0, sizeof(w->out));
	w->out.addr = *to;
	w->out.port = bpf_htons(candidate);
	w->out.created_ns = w->out.last_seen_ns = now;
	if (bpf_map_update_elem(&lb_snat, &w->out_key, &w->out, BPF_ANY)) {
		bpf_map_delete_elem(&lb_snat, &w->in_key);
		return -1;
	}
	*to_port = w->out.port;
	return 0;
}

/* A backend's answer to a SNAT mapping (backend -> node:port): the client it
 * goes back to. 0 when it is not one. */
static __always_inline int snat_reverse(const struct packet *pkt, __u64 now,
					union pyebpflb_addr *client, __u16 *client_port)
{
	struct pyebpflb_snat_entry *found;
	struct pyebpflb_ct_key key;

	snat_key(&key, &pkt->saddr, pkt->sport, &pkt->daddr, pkt->dport, pkt, PYEBPFLB_SNAT_IN);
	found = bpf_map_lookup_elem(&lb_snat, &key);
	if (!found)
		return 0;
	*client = found->addr;
	*client_port = found->port;
	snat_touch(found, pkt, now);
	return 1;
}

/* Could the packet be an answer to a SNAT mapping? Its destination is the
 * address mappings take (the node's): one compare before the lookup for most
 * traffic. A node without an address of the family maps to the frontend's
 * addresses: then every packet is looked up. */
static __always_inline int snat_candidate(const struct packet *pkt)
{
	struct pyebpflb_node *self = node();
	const union pyebpflb_addr *own;

	if (!self)
		return 0;
	own = pkt->family == PYEBPFLB_IPV4 ? &self->v4 : &self->v6;
	if (!(own->v6[0] | own->v6[1] | own->v6[2] | own->v6[3]))
		return 1;
	return addr_equal(own, &pkt->daddr);
}

/*
 * Send a translated packet out where the routing table says (from
 * `src` to `dst`, its addresses now): the neighbour's address from the FIB
 * when it knows it, else the kernel resolves it (tc). CTX_DROP, with
 * `*no_route` set, when there is no route.
 */
static __always_inline int fib_forward(struct ctx_buff *ctx, const struct packet *pkt,
				       struct bpf_fib_lookup *fib, const union pyebpflb_addr *src,
				       const union pyebpflb_addr *dst, int *no_route)
{
	long found;

	__builtin_memset(fib, 0, sizeof(*fib));
	fib->ifindex = ctx_ingress_ifindex(ctx);
	fib->l4_protocol = pkt->proto;
	if (pkt->family == PYEBPFLB_IPV4) {
		fib->family = AF_INET;
		fib->ipv4_src = src->v4;
		fib->ipv4_dst = dst->v4;
	} else {
		fib->family = AF_INET6;
		__builtin_memcpy(fib->ipv6_src, src->v6, 16);
		__builtin_memcpy(fib->ipv6_dst, dst->v6, 16);
	}
	found = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	if (pkt->dry)
		return CTX_PASS;
	if (found == BPF_FIB_LKUP_RET_SUCCESS) {
		if (ctx_store_bytes(ctx, 0, fib->dmac, ETH_ALEN) ||
		    ctx_store_bytes(ctx, ETH_ALEN, fib->smac, ETH_ALEN))
			return CTX_DROP;
		return ctx_redirect(ctx, fib->ifindex, 1);
	}
	if (found == BPF_FIB_LKUP_RET_NO_NEIGH)
		return ctx_redirect(ctx, fib->ifindex, 0);
	*no_route = 1;
	return CTX_DROP;
}

#endif
