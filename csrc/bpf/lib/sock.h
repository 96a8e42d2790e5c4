/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Socket-level balancing (lb_sock.bpf.c): a local process's connect() or
 * sendmsg() to a service address is pointed at a backend once, at the
 * socket, as Cilium's bpf_sock.c does. Its packets then carry the backend's
 * address from the start: no per-packet translation, no reverse NAT on the
 * wire, no hairpin. recvmsg() and getpeername() show the service address
 * again, from lb_sock_revnat. The choice of backend, policy, counters and
 * events are the packet path's own (lib/select.h, lib/policy.h, ...).
 */
#ifndef PYEBPFLB_BPF_SOCK_H
#define PYEBPFLB_BPF_SOCK_H

#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"

/* A translated socket -> the service address it asked for. The map is part
 * of every program's object (its layout), used by the socket programs only. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pyebpflb_sock_key);
	__type(value, struct pyebpflb_sock_revnat);
} lb_sock_revnat SEC(".maps");

#ifdef PYEBPFLB_CTX_SOCK

#include "lib/config.h"
#include "lib/counters.h"
#include "lib/events.h"
#include "lib/node.h"
#include "lib/policy.h"
#include "lib/select.h"
#include "lib/service.h"

#define SOCK_PROCEED 1 /* the system call goes on (translated or not) */
#define SOCK_REFUSE  0 /* it fails with the errno bpf_set_retval gave */

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif
#ifndef EHOSTUNREACH
#define EHOSTUNREACH 113
#endif
#ifndef EPERM
#define EPERM 1
#endif

/* The socket belongs to the datapath's network namespace: sockets of other
 * namespaces in the same cgroup are none of its business. */
static __always_inline int sock_ours(struct bpf_sock_addr *ctx, const struct pyebpflb_node *self)
{
	return self && self->netns_cookie && bpf_get_netns_cookie(ctx) == self->netns_cookie;
}

static __always_inline int sock_refuse(struct bpf_sock_addr *ctx, const struct packet *pkt,
				       __u8 reason, __u32 service_id, int err)
{
	note_drop(ctx, pkt, PYEBPFLB_POLICY_INGRESS, reason, service_id, 0);
	bpf_set_retval(err);
	return SOCK_REFUSE;
}

/*
 * The backend for a socket's connect()/sendmsg() to `pkt->daddr:dport`, in
 * `chosen`. Returns 1 when translated, 0 when the address is no service's
 * (the call goes on untouched), -1 when refused (errno set): a port no
 * service of the address has, a service without backends (ECONNREFUSED, as
 * kube-proxy's REJECT), internalTrafficPolicy Local without a local backend
 * (EHOSTUNREACH: kube-proxy drops, a local caller learns at once), policy
 * (EPERM).
 */
static __always_inline int sock_select(struct bpf_sock_addr *ctx, const struct packet *pkt,
				       struct pyebpflb_backend *chosen, __u32 *service_id)
{
	struct pyebpflb_lb_config *cfg = config();
	struct pyebpflb_backend *backend = NULL;
	struct pyebpflb_policy_verdict verdict = {};
	struct pyebpflb_policy_head *policy;
	struct pyebpflb_service *found;
	struct pyebpflb_service svc;
	__u64 now = bpf_ktime_get_coarse_ns();
	__u32 backend_id;

	if (!cfg)
		return 0;
	found = service_lookup(pkt, cfg);
	if (!found) {
		if (!vip_known(pkt))
			return 0;
		sock_refuse(ctx, pkt, PYEBPFLB_DROP_NO_SERVICE_PORT, 0, -ECONNREFUSED);
		return -1;
	}
	svc = *found; /* one copy to decide by (lib/balance.h's scratch says why) */
	*service_id = svc.id;
	backend_id = select_backend(&svc, pkt, cfg, now, &backend);
	if (backend_id && backend)
		*chosen = *backend;
	else
		backend_id = 0;
	policy = policy_head(cfg);
	if (policy &&
	    policy_decide(ctx, policy, PYEBPFLB_POLICY_INGRESS, pkt,
			  backend_id ? &chosen->addr : &pkt->daddr, svc.id,
			  backend_id ? chosen->port : pkt->dport, 0, &verdict) == POLICY_DROP) {
		bpf_set_retval(-EPERM);
		return -1;
	}
	if (!backend_id) {
		count_new_flow(&lb_svc_stats, svc.id, 0);
		if (svc.flags & PYEBPFLB_SERVICE_LOCAL_ONLY)
			sock_refuse(ctx, pkt, PYEBPFLB_DROP_NO_LOCAL_BACKEND, svc.id,
				    -EHOSTUNREACH);
		else
			sock_refuse(ctx, pkt, PYEBPFLB_DROP_NO_BACKEND, svc.id, -ECONNREFUSED);
		return -1;
	}
	if (policy && verdict.action != PYEBPFLB_POLICY_NONE)
		policy_event(ctx, pkt, PYEBPFLB_POLICY_INGRESS, &verdict, svc.id);
	if (svc.affinity_timeout_s && !(svc.flags & PYEBPFLB_SERVICE_MAGLEV))
		remember_affinity(&svc, pkt, backend_id, now);
	note_new_flow(ctx, pkt, chosen, svc.id, backend_id);
	return 1;
}

/* Remember what the socket asked for, under where it went. */
static __always_inline void sock_remember(struct bpf_sock_addr *ctx, const struct packet *pkt,
					  const struct pyebpflb_backend *backend, __u32 service_id)
{
	struct pyebpflb_sock_key key = {.cookie = bpf_get_socket_cookie(ctx),
					.addr = backend->addr,
					.port = backend->port,
					.family = backend->family};
	struct pyebpflb_sock_revnat value = {
	    .vip = pkt->daddr, .port = pkt->dport, .family = pkt->family, .service_id = service_id};

	bpf_map_update_elem(&lb_sock_revnat, &key, &value, BPF_ANY);
}

/* The service address a socket's peer `addr:port` stands for, or NULL. */
static __always_inline struct pyebpflb_sock_revnat *
sock_recall(struct bpf_sock_addr *ctx, const union pyebpflb_addr *addr, __u16 port, __u8 family)
{
	struct pyebpflb_sock_key key = {
	    .cookie = bpf_get_socket_cookie(ctx), .addr = *addr, .port = port, .family = family};

	return bpf_map_lookup_elem(&lb_sock_revnat, &key);
}

/*
 * The flow as the choice of backend sees it. The socket has no source port
 * yet: its cookie stands in, so that sockets spread over the backends while
 * one socket's datagrams (sendmsg) all go to one. The source is the address
 * the socket is bound to, else the node's: what policy sees as the peer and
 * session affinity as the client (every local process is one client, the
 * node, as under kube-proxy).
 */
static __always_inline void sock_packet(struct bpf_sock_addr *ctx, struct packet *pkt,
					const struct pyebpflb_node *self, __u8 family,
					const union pyebpflb_addr *source)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);

	pkt->family = family;
	pkt->proto = ctx->protocol;
	pkt->dport = (__u16)ctx->user_port;
	pkt->sport = (__u16)(cookie ^ (cookie >> 16) ^ (cookie >> 32) ^ (cookie >> 48));
	pkt->saddr = *source;
	if (family == PYEBPFLB_IPV4
		? !source->v4
		: !(source->v6[0] | source->v6[1] | source->v6[2] | source->v6[3]))
		pkt->saddr = family == PYEBPFLB_IPV4 ? self->v4 : self->v6;
}

static __always_inline int sock_proto_ok(const struct bpf_sock_addr *ctx)
{
	return ctx->protocol == IPPROTO_TCP || ctx->protocol == IPPROTO_UDP;
}

/* ::ffff:a.b.c.d: an IPv6 socket speaking IPv4 */
static __always_inline int v4_mapped(const __u32 *v6)
{
	return v6[0] == 0 && v6[1] == 0 && v6[2] == bpf_htonl(0xffff);
}

/* connect4 / sendmsg4: IPv4 destination in user_ip4 (source: `src`). */
static __always_inline int sock4_translate(struct bpf_sock_addr *ctx, __u32 src)
{
	struct pyebpflb_node *self = node();
	struct pyebpflb_backend backend;
	union pyebpflb_addr source = {}; /* all 16 bytes: a key's */
	struct packet pkt = {};
	__u32 service_id = 0;
	int verdict;

	if (!sock_proto_ok(ctx) || !sock_ours(ctx, self))
		return SOCK_PROCEED;
	source.v4 = src;
	pkt.daddr.v4 = ctx->user_ip4;
	sock_packet(ctx, &pkt, self, PYEBPFLB_IPV4, &source);
	verdict = sock_select(ctx, &pkt, &backend, &service_id);
	if (verdict <= 0)
		return verdict ? SOCK_REFUSE : SOCK_PROCEED;
	ctx->user_ip4 = backend.addr.v4;
	ctx->user_port = backend.port;
	sock_remember(ctx, &pkt, &backend, service_id);
	return SOCK_PROCEED;
}

/* connect6 / sendmsg6: IPv6 destination in user_ip6, v4-mapped ones as IPv4. */
static __always_inline int sock6_translate(struct bpf_sock_addr *ctx, const __u32 *src)
{
	struct pyebpflb_node *self = node();
	struct pyebpflb_backend backend;
	union pyebpflb_addr source = {};
	struct packet pkt = {};
	__u32 service_id = 0, dst[4];
	int verdict, mapped;

	if (!sock_proto_ok(ctx) || !sock_ours(ctx, self))
		return SOCK_PROCEED;
	for (int i = 0; i < 4; i++)
		dst[i] = ctx->user_ip6[i];
	mapped = v4_mapped(dst);
	if (mapped) {
		pkt.daddr.v4 = dst[3];
		source.v4 = v4_mapped(src) ? src[3] : 0;
	} else {
		for (int i = 0; i < 4; i++) {
			pkt.daddr.v6[i] = dst[i];
			source.v6[i] = src[i];
		}
	}
	sock_packet(ctx, &pkt, self, mapped ? PYEBPFLB_IPV4 : PYEBPFLB_IPV6, &source);
	verdict = sock_select(ctx, &pkt, &backend, &service_id);
	if (verdict <= 0)
		return verdict ? SOCK_REFUSE : SOCK_PROCEED;
	if (mapped) {
		ctx->user_ip6[3] = backend.addr.v4;
	} else {
		ctx->user_ip6[0] = backend.addr.v6[0];
		ctx->user_ip6[1] = backend.addr.v6[1];
		ctx->user_ip6[2] = backend.addr.v6[2];
		ctx->user_ip6[3] = backend.addr.v6[3];
	}
	ctx->user_port = backend.port;
	sock_remember(ctx, &pkt, &backend, service_id);
	return SOCK_PROCEED;
}

/* recvmsg4 / getpeername4: a backend's address shown as the service's. */
static __always_inline int sock4_reverse(struct bpf_sock_addr *ctx)
{
	union pyebpflb_addr peer =
	    {}; /* all 16 bytes: a designated .v4 leaves the rest undefined */
	struct pyebpflb_sock_revnat *vip;

	if (!sock_proto_ok(ctx) || !sock_ours(ctx, node()))
		return SOCK_PROCEED;
	peer.v4 = ctx->user_ip4;
	vip = sock_recall(ctx, &peer, (__u16)ctx->user_port, PYEBPFLB_IPV4);
	if (vip) {
		ctx->user_ip4 = vip->vip.v4;
		ctx->user_port = vip->port;
	}
	return SOCK_PROCEED;
}

static __always_inline int sock6_reverse(struct bpf_sock_addr *ctx)
{
	struct pyebpflb_sock_revnat *vip;
	union pyebpflb_addr peer = {};
	__u32 addr[4];
	int mapped;

	if (!sock_proto_ok(ctx) || !sock_ours(ctx, node()))
		return SOCK_PROCEED;
	for (int i = 0; i < 4; i++)
		addr[i] = ctx->user_ip6[i];
	mapped = v4_mapped(addr);
	if (mapped)
		peer.v4 = addr[3];
	else
		for (int i = 0; i < 4; i++)
			peer.v6[i] = addr[i];
	vip =
	    sock_recall(ctx, &peer, (__u16)ctx->user_port, mapped ? PYEBPFLB_IPV4 : PYEBPFLB_IPV6);
	if (!vip)
		return SOCK_PROCEED;
	if (mapped) {
		ctx->user_ip6[3] = vip->vip.v4;
	} else {
		ctx->user_ip6[0] = vip->vip.v6[0];
		ctx->user_ip6[1] = vip->vip.v6[1];
		ctx->user_ip6[2] = vip->vip.v6[2];
		ctx->user_ip6[3] = vip->vip.v6[3];
	}
	ctx->user_port = vip->port;
	return SOCK_PROCEED;
}

#endif /* PYEBPFLB_CTX_SOCK */

#endif
