/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The load balancer's two directions as named steps, written once over the
 * packet context (lib/ctx.h): lb.bpf.c runs them on tc, lb_xdp.bpf.c runs
 * the ingress on XDP.
 *
 * Ingress translates packets for a service VIP:port to a backend (DNAT) and
 * records the flow; egress translates the backends' replies back (reverse
 * NAT), so the client only ever sees the VIP. Anything else meets policy, or
 * passes untouched when there is none.
 */
#ifndef PYEBPFLB_BPF_BALANCE_H
#define PYEBPFLB_BPF_BALANCE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/config.h"
#include "lib/counters.h"
#include "lib/ct.h"
#include "lib/ctx.h"
#include "lib/drops.h"
#include "lib/dsr.h"
#include "lib/events.h"
#include "lib/icmp.h"
#include "lib/keep.h"
#include "lib/nat.h"
#include "lib/node.h"
#include "lib/nodeport.h"
#include "lib/parse.h"
#include "lib/policy.h"
#include "lib/select.h"
#include "lib/service.h"

/* A step that did not decide the packet's fate: go on to the next. */
#define NEXT_STEP (-100)
/* A step that refuses the packet: the caller sends the refusal (reject()),
 * from one place, so the refusal's buffers are on the stack once. */
#define REFUSE_STEP (-101)
/* dsr_arrival recorded a flow another node balanced here. */
#define DSR_RECORDED (-102)
/* A DNATed packet that goes on by SNAT (to the target in the scratch slot's
 * snat_work) or carries the DSR option: done by the caller, from one place,
 * as a refusal (each inlined copy of a step has stack slots of its own). */
#define SNAT_STEP (-103)
#define DSR_STEP  (-104)

/*
 * The packet and its flow's key live in a per-CPU slot, not on the stack: a
 * BPF program has 512 bytes of stack for all its frames, and the steps' own
 * locals (keys, entries, a refusal's quote) need them. One slot per hook:
 * the two never run nested on one CPU (softirq context), but a slot each
 * costs nothing. (Pointers stay on the stack: the verifier forgets what a
 * pointer stored in a map value pointed to. Under PREEMPT_RT, where softirqs
 * are threads, two packets could share a slot: not a kernel for this yet.)
 */
struct scratch {
	struct packet pkt;
	struct pyebpflb_ct_key ct_key;
	__u64 now;  /* bpf_ktime_get_coarse_ns() when the packet arrived */
	int parsed; /* enum parse_result */
	/*
	 * Copies of the map entries a packet is decided by, taken right after
	 * each lookup: a hash map's element can be freed and reused for another
	 * key at once (bpf_mem_alloc has no grace period, an LRU reuses its own),
	 * so every field of a decision is read from one copy, and a packet is
	 * never balanced as one flow or service and counted or policed as
	 * another.
	 */
	struct pyebpflb_ct_entry flow;
	struct pyebpflb_service svc;
	struct pyebpflb_backend backend;
	struct snat_work snat;	   /* a new SNAT mapping's keys and entries (lib/nodeport.h) */
	union dsr_header dsr;	   /* lib/dsr.h */
	__u8 quote[QUOTE_MAX + 4]; /* a refusal's quoted headers (lib/icmp.h) */
};

/* Explain's dry runs (BPF_PROG_TEST_RUN from user space, preemption but not
 * softirqs off) have their own slot: a packet's softirq that interrupts one
 * on its CPU must not overwrite the other's state. */
enum { SCRATCH_INGRESS = 0, SCRATCH_EGRESS = 1, SCRATCH_PROBE = 2 };

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, struct scratch);
} lb_scratch SEC(".maps");

/* What every step knows about the packet. */
struct ingress {
	struct packet *pkt;		/* in this CPU's scratch slot */
	struct pyebpflb_ct_key *ct_key; /* the flow's SERVICE key, in the slot too */
	struct pyebpflb_lb_config *cfg;
	struct pyebpflb_policy_head *policy; /* NULL: no policy installed */
	struct ct_place flow_at;	     /* where follow_flow found the flow */
};

/* The scratch slot of a packet's steps (its packet is the slot's first member:
 * one pointer on the stack reaches the copies too). */
static __always_inline struct scratch *slot(const struct ingress *in)
{
	return (struct scratch *)in->pkt;
}

/* Parse the packet into this hook's slot; 0 when it goes on to the steps. */
static __always_inline int start(struct ctx_buff *ctx, struct ingress *in, __u32 hook)
{
	__u32 index = ctx_probing(ctx) ? SCRATCH_PROBE : hook;
	struct scratch *scratch = bpf_map_lookup_elem(&lb_scratch, &index);

	if (!scratch)
		return -1;
	in->pkt = &scratch->pkt;
	in->ct_key = &scratch->ct_key;
	slot(in)->parsed = parse_packet(ctx, in->pkt);
	in->pkt->dry = ctx_probing(ctx);
	in->cfg = config();
	if (!in->cfg)
		return -1;
	keep_maps(in->cfg);
	/* Jiffy resolution is plenty for timeouts of seconds, at a fraction of the cost. */
	slot(in)->now = bpf_ktime_get_coarse_ns();
	in->policy = policy_head(in->cfg);
	return 0;
}

/* Not a service flow: policy decides, or it passes untouched. */
static __always_inline int unrelated(struct ctx_buff *ctx, struct ingress *in, __u8 dir)
{
	if (!in->policy)
		return CTX_PASS;
	return policy_enforce(ctx, in->policy, dir, in->pkt, slot(in)->parsed, in->cfg,
			      slot(in)->now);
}

/* The service of the packet's destination, copied into the scratch slot; 0: none. */
static __always_inline int copy_service(struct ingress *in)
{
	struct pyebpflb_service *svc = service_lookup(in->pkt, in->cfg);

	if (!svc)
		return 0;
	slot(in)->svc = *svc;
	return 1;
}

/* A backend found in lb_backends, copied into the scratch slot. */
static __always_inline struct pyebpflb_backend *keep_backend(struct ingress *in,
							     const struct pyebpflb_backend *found)
{
	slot(in)->backend = *found;
	return &slot(in)->backend;
}

/* Backend `id`, copied into the scratch slot; 0 when it is gone. */
static __always_inline int copy_backend(struct ingress *in, __u32 id)
{
	struct pyebpflb_backend *found = backend_lookup(id);

	if (!found)
		return 0;
	keep_backend(in, found);
	return 1;
}

/*
 * External traffic to a backend on another node: the source becomes this
 * node's (a port of its own, lb_snat), so the answer comes back here, and the
 * packet goes back out by the FIB (the stack would drop a packet arriving
 * with one of its own addresses as source).
 */
static __always_inline int snat_out(struct ctx_buff *ctx, const struct ingress *in)
{
	struct snat_work *w = &slot(in)->snat;
	const union pyebpflb_addr *addr = &w->backend.addr;
	const struct packet *pkt = in->pkt;
	__u32 service_id = w->service_id;
	__u16 port = w->backend.port;
	int no_route = 0, verdict;
	__u16 source_port;

	if (snat_mapping(ctx, pkt, w, addr, port, in->cfg, slot(in)->now, &w->to, &source_port)) {
		note_drop(ctx, pkt, PYEBPFLB_POLICY_INGRESS, PYEBPFLB_DROP_NO_NAT_PORT, service_id,
			  0);
		return CTX_DROP;
	}
	if (snat(ctx, pkt, &w->to, source_port))
		return CTX_DROP;
	verdict = fib_forward(ctx, pkt, &w->fib, &w->to, addr, &no_route);
	if (no_route)
		note_drop(ctx, pkt, PYEBPFLB_POLICY_INGRESS, PYEBPFLB_DROP_NO_ROUTE, service_id, 0);
	return verdict;
}

/* A DSR flow's packet: the frontend rides along on its first (lib/dsr.h); the
 * client's address stays, so the stack forwards it as any routed packet. */
static __always_inline int dsr_out(struct ctx_buff *ctx, const struct ingress *in)
{
	const struct packet *pkt = in->pkt;

	if (dsr_marks(pkt) && dsr_fits(pkt) && !pkt->dry &&
	    dsr_add(ctx, pkt, &slot(in)->dsr, &pkt->daddr, pkt->dport))
		return CTX_DROP;
	return CTX_PASS;
}

/*
 * Send the packet to its backend (`flags`: the flow's, enum pyebpflb_ct_flags).
 * A hairpin flow (the client is the backend itself: a pod calling its own
 * service) also gets the datapath's hairpin address as its source, as
 * Cilium's service loopback address does: the backend would drop a packet
 * from its own address arriving from outside, and its answer must come back
 * through the datapath to be translated. A SNAT flow gets this node's.
 */
static __always_inline int dnat_to(struct ctx_buff *ctx, const struct ingress *in,
				   const union pyebpflb_addr *addr, __u16 port, __u8 flags,
				   __u32 service_id)
{
	const struct packet *pkt = in->pkt;

	const union pyebpflb_addr *source =
	    flags & PYEBPFLB_CT_HAIRPIN ? hairpin_addr(in->cfg, pkt->family) : NULL;

	if (dnat(ctx, pkt, addr, port))
		return CTX_DROP;
	if (flags & PYEBPFLB_CT_SNAT) {
		slot(in)->snat.backend.addr = *addr;
		slot(in)->snat.backend.port = port;
		slot(in)->snat.service_id = service_id;
		return SNAT_STEP;
	}
	if (flags & PYEBPFLB_CT_DSR)
		return DSR_STEP;
	if (source && rewrite_addr(ctx, pkt, saddr_off(pkt), &pkt->saddr, source, 1))
		return CTX_DROP;
	frag_remember(pkt, source, addr);
	return CTX_PASS;
}

/* Policy on a packet of a service flow: the rules naming the service, and the
 * others on its real destination. The first packet of a flow it lets through
 * makes a policy event. */
static __always_inline int service_denied(struct ctx_buff *ctx, const struct ingress *in,
					  __u32 service_id, const union pyebpflb_addr *local,
					  __u16 port, int new_flow)
{
	struct pyebpflb_policy_verdict verdict;

	if (!in->policy)
		return 0;
	if (policy_decide(ctx, in->policy, PYEBPFLB_POLICY_INGRESS, in->pkt, local, service_id,
			  port, 0, &verdict) == POLICY_DROP)
		return 1;
	if (new_flow && verdict.action != PYEBPFLB_POLICY_NONE)
		policy_event(ctx, in->pkt, PYEBPFLB_POLICY_INGRESS, &verdict, service_id);
	return 0;
}

/*
 * The translation a new flow to `backend` needs beyond DNAT: SNAT when the
 * backend runs on another node. What arrives on an attached interface comes
 * from outside the node (the node's own processes are balanced at the
 * socket), and the backend's answer would go to the client straight from its
 * node, untranslated: kube-proxy masquerades such traffic to a NodePort,
 * external or load-balancer IP, and to a ClusterIP from outside the cluster.
 */
static __always_inline __u8 nat_flags(const struct pyebpflb_service *svc,
				      const struct pyebpflb_backend *backend,
				      const struct packet *pkt)
{
	if (!backend->remote)
		return 0;
#ifndef PYEBPFLB_CTX_XDP /* XDP cannot insert the option */
	/* Direct server return where the service asks for it and the packet has
	 * room for the option; SNAT otherwise. */
	if ((svc->flags & PYEBPFLB_SERVICE_DSR) && dsr_fits(pkt))
		return PYEBPFLB_CT_DSR;
#endif
	return PYEBPFLB_CT_SNAT;
}

/* Policy allowing, record the new flow (and the client's choice, for `svc`
 * under session affinity) and send it to its backend, translated as `nat`
 * says (enum pyebpflb_ct_flags). NEXT_STEP when a live flow holds that
 * backend's side of the tuple. */
static __always_inline int admit(struct ctx_buff *ctx, struct ingress *in,
				 const struct pyebpflb_backend *backend, __u32 backend_id,
				 __u32 service_id, const struct pyebpflb_service *svc, __u8 nat)
{
	int err = ct_create(in->ct_key, in->pkt, backend, backend_id, service_id, nat, in->cfg,
			    slot(in)->now);

	if (err == CT_TUPLE_IN_USE)
		return NEXT_STEP; /* the caller tries another backend */
	if (err) {
		note_drop(ctx, in->pkt, PYEBPFLB_POLICY_INGRESS, PYEBPFLB_DROP_CT_FULL, service_id,
			  0);
		return CTX_DROP;
	}
	if (svc && svc->affinity_timeout_s && !(svc->flags & PYEBPFLB_SERVICE_MAGLEV))
		remember_affinity(svc, in->pkt, backend_id, slot(in)->now);
	note_new_flow(ctx, in->pkt, backend, service_id, backend_id);
	if (addr_equal(&backend->addr, &in->pkt->saddr))
		nat |= PYEBPFLB_CT_HAIRPIN;
	return dnat_to(ctx, in, &backend->addr, backend->port, nat, service_id);
}

/*
 * A new connection on a reused client port goes to the backend the old one
 * had, while that backend is in the service: its TCP stack knows the tuple
 * (TIME_WAIT) and handles the reuse, as it would without a load balancer.
 * Another backend would meet the old connection's stray segments and the
 * client's resets for them.
 */
static __always_inline int reopen_flow(struct ctx_buff *ctx, struct ingress *in)
{
	const struct pyebpflb_ct_entry *flow = &slot(in)->flow;
	__u32 backend_id = flow->backend_id, service_id = flow->service_id;
	__u8 nat = flow->flags & (PYEBPFLB_CT_SNAT | PYEBPFLB_CT_DSR);

	/* The old flow goes, both halves (it may sit in another map than new flows start in). */
	ct_delete_flow(in->flow_at.map, in->ct_key, flow, in->pkt, in->cfg);
	if (!copy_backend(in, backend_id))
		return NEXT_STEP;
	explain(ctx, in->pkt, PYEBPFLB_EXPLAIN_BACKEND, backend_id);
	if (service_denied(ctx, in, service_id, &slot(in)->backend.addr, slot(in)->backend.port, 1))
		return CTX_DROP;
	return admit(ctx, in, &slot(in)->backend, backend_id, service_id, NULL, nat);
}

/*
 * A flow whose backend left the service (or no longer exists), as Cilium
 * handles it: a TCP SYN on the tuple and any UDP packet start a new flow to a
 * live backend; any other TCP packet gets a reset, so the client learns at
 * once that its connection is gone instead of retransmitting into a dead
 * address until it times out. A backend on its way out stays in lb_backends
 * as terminating until its endpoint is removed, and its flows go on.
 */
static __always_inline int backend_gone(struct ctx_buff *ctx, struct ingress *in,
					const struct pyebpflb_ct_entry *flow)
{
	__u32 service_id = flow->service_id;

	ct_delete_flow(in->flow_at.map, in->ct_key, flow, in->pkt, in->cfg);
	if (in->pkt->proto != IPPROTO_TCP || tcp_opens(in->pkt))
		return NEXT_STEP;
	explain(ctx, in->pkt, PYEBPFLB_EXPLAIN_SERVICE, service_id);
	note_drop(ctx, in->pkt, PYEBPFLB_POLICY_INGRESS, PYEBPFLB_DROP_BACKEND_GONE, service_id, 0);
	if (in->pkt->tcp_flags & TCP_FLAG_RST)
		return CTX_DROP; /* a reset is never answered with one */
	return REFUSE_STEP;
}

static __always_inline int continue_flow(struct ctx_buff *ctx, struct ingress *in,
					 struct pyebpflb_ct_entry *live)
{
	const struct pyebpflb_ct_entry *flow = &slot(in)->flow;
	struct packet *pkt = in->pkt;

	if (!copy_backend(in, flow->backend_id))
		return backend_gone(ctx, in, flow);
	/* The entry was reused for another flow while we read it: decide afresh. */
	if (slot(in)->backend.service_id != flow->service_id)
		return NEXT_STEP;
	/* Policy holds for every packet: a new deny ends a flow at once. */
	explain(ctx, pkt, PYEBPFLB_EXPLAIN_SERVICE, flow->service_id);
	explain(ctx, pkt, PYEBPFLB_EXPLAIN_BACKEND, flow->backend_id);
	if (service_denied(ctx, in, flow->service_id, &flow->nat_addr, flow->nat_port, 0))
		return CTX_DROP;
	ct_heal_reply(in->flow_at.map, in->ct_key, flow, pkt, in->cfg, slot(in)->now);
	ct_touch(live, pkt, slot(in)->now, 0);
	if (!pkt->dry) {
		count_traffic(&lb_svc_stats, flow->service_id, ctx_len(ctx));
		count_traffic(&lb_be_stats, flow->backend_id, ctx_len(ctx));
	}
	return dnat_to(ctx, in, &flow->nat_addr, flow->nat_port, flow->flags, flow->service_id);
}

/* A packet of a known flow goes where the flow went. */
static __always_inline int follow_flow(struct ctx_buff *ctx, struct ingress *in)
{
	struct pyebpflb_ct_entry *flow;

	ct_key_of(in->ct_key, in->pkt, PYEBPFLB_CT_SERVICE);
	flow = ct_lookup_service(in->ct_key, in->pkt, in->cfg, slot(in)->now, &in->flow_at);
	if (!flow)
		return NEXT_STEP;
	slot(in)->flow = *flow; /* one copy to decide by */
	if (ct_reopens(&slot(in)->flow, in->pkt))
		return reopen_flow(ctx, in);
	return continue_flow(ctx, in, flow);
}

/* The service has no backend for the flow: counted, and refused (kube-proxy's
 * REJECT; the caller sends the refusal). */
static __always_inline int refuse(struct ctx_buff *ctx, struct ingress *in, __u32 service_id)
{
	int local_only = slot(in)->svc.flags & PYEBPFLB_SERVICE_LOCAL_ONLY;

	explain(ctx, in->pkt, PYEBPFLB_EXPLAIN_SERVICE, service_id);
	if (!in->pkt->dry)
		count_new_flow(&lb_svc_stats, service_id, ctx_len(ctx));
	/* internalTrafficPolicy Local with no backend on this node: dropped, as
	 * kube-proxy does ("has no local endpoints"). */
	note_drop(ctx, in->pkt, PYEBPFLB_POLICY_INGRESS,
		  local_only ? PYEBPFLB_DROP_NO_LOCAL_BACKEND : PYEBPFLB_DROP_NO_BACKEND,
		  service_id, 0);
	return local_only ? CTX_DROP : REFUSE_STEP;
}

/* A new flow to a service: a backend, policy, then the flow. */
static __always_inline int new_flow(struct ctx_buff *ctx, struct ingress *in)
{
	struct pyebpflb_backend *backend = NULL;
	struct pyebpflb_service *svc = &slot(in)->svc;
	__u32 backend_id;
	int verdict;

	if (!copy_service(in)) {
		/* A service's address on a port none of its services has: refused, as
		 * kube-proxy's nftables mode does, not routed on to whatever answers. */
		if (vip_known(in->pkt)) {
			note_drop(ctx, in->pkt, PYEBPFLB_POLICY_INGRESS,
				  PYEBPFLB_DROP_NO_SERVICE_PORT, 0, 0);
			return REFUSE_STEP;
		}
		ct_direct(in->pkt, in->cfg, slot(in)->now);
		return unrelated(ctx, in, PYEBPFLB_POLICY_INGRESS);
	}
	explain(ctx, in->pkt, PYEBPFLB_EXPLAIN_SERVICE, svc->id);
	/* loadBalancerSourceRanges: before anything else, and apart from policy (an
	 * allow rule for the backend cannot open it). */
	if ((svc->flags & PYEBPFLB_SERVICE_SOURCE_RANGES) && !source_allowed(svc->id, in->pkt)) {
		note_drop(ctx, in->pkt, PYEBPFLB_POLICY_INGRESS, PYEBPFLB_DROP_SOURCE_RANGE,
			  svc->id, 0);
		return CTX_DROP;
	}
	backend_id = select_backend(svc, in->pkt, in->cfg, slot(in)->now, &backend);
	if (!backend_id && svc->count) {
		/* An update removed the chosen backend between our reads; the
		 * service entry has moved on to a complete new set: read it again. */
		if (!copy_service(in))
			return CTX_PASS;
		backend_id = svc->count ? slot_backend(svc, in->pkt, 0, &backend) : 0;
	}
	backend = backend ? keep_backend(in, backend) : NULL;
	if (backend)
		explain(ctx, in->pkt, PYEBPFLB_EXPLAIN_BACKEND, backend_id); /* even if denied */
	/* Without a backend, the rules on the real destination see the VIP's port. */
	if (service_denied(ctx, in, svc->id, backend ? &backend->addr : &in->pkt->daddr,
			   backend ? backend->port : in->pkt->dport, 1))
		return CTX_DROP;
	if (!backend_id || !backend)
		return refuse(ctx, in, svc->id);
	verdict =
	    admit(ctx, in, backend, backend_id, svc->id, svc, nat_flags(svc, backend, in->pkt));
	if (verdict != NEXT_STEP)
		return verdict;
	/* A live flow from this client address and port holds the chosen backend's
	 * side of the tuple (through another service): one more draw. */
	backend_id = slot_backend(svc, in->pkt, 1, &backend);
	backend = backend ? keep_backend(in, backend) : NULL;
	if (backend_id && backend) {
		verdict = admit(ctx, in, backend, backend_id, svc->id, svc,
				nat_flags(svc, backend, in->pkt));
		if (verdict != NEXT_STEP)
			return verdict;
	}
	note_drop(ctx, in->pkt, PYEBPFLB_POLICY_INGRESS, PYEBPFLB_DROP_TUPLE_IN_USE, svc->id, 0);
	return CTX_DROP;
}

/* An ICMP error about a balanced flow, sent to its VIP (path MTU discovery
 * through the load balancer), goes on to the backend; one about a packet
 * SNATed to a remote backend, to the client; anything else meets policy. */
static __always_inline int icmp_ingress(struct ctx_buff *ctx, struct ingress *in)
{
	struct snat_work *w = &slot(in)->snat;
	int translated = icmp_error_dnat(ctx, in->pkt, w, in->cfg, slot(in)->now);
	int no_route = 0;

	if (translated < 0)
		return CTX_DROP;
	if (translated == ICMP_RELAYED) /* from this node: out by the FIB */
		return fib_forward(ctx, in->pkt, &w->fib, &w->to, &w->backend.addr, &no_route);
	if (translated)
		return CTX_PASS;
	/* About a packet SNATed to a remote backend: to the client, out by the FIB. */
	translated = icmp_error_snat(ctx, in->pkt, w, in->cfg, slot(in)->now);
	if (translated < 0)
		return CTX_DROP;
	if (translated)
		return fib_forward(ctx, in->pkt, &w->fib, &w->vip, &w->client, &no_route);
	return unrelated(ctx, in, PYEBPFLB_POLICY_INGRESS);
}

/*
 * A backend's answer in a live flow (under REPLY key `key`): the flow's life is
 * kept on its SERVICE entry, which answers refresh and mark answered; an
 * unconfirmed TCP flow moves on to lb_ct; the answer is counted as a reply of
 * the flow's service and backend (their ids read before the move frees `flow`).
 */
static __always_inline void answer_seen(struct ctx_buff *ctx, const struct ingress *in,
					const struct pyebpflb_ct_key *key,
					const struct pyebpflb_ct_entry *reply,
					struct pyebpflb_ct_entry *flow, int unconfirmed)
{
	__u32 service_id = flow->service_id, backend_id = flow->backend_id;

	ct_touch(flow, in->pkt, slot(in)->now, 1);
	if (unconfirmed)
		ct_confirm(key, reply, flow, in->pkt);
	/* A DSR flow another node balanced has no service or backend here (id 0). */
	if (!in->pkt->dry && service_id) {
		count_reply(&lb_svc_stats, service_id, ctx_len(ctx));
		count_reply(&lb_be_stats, backend_id, ctx_len(ctx));
	}
}

/*
 * A backend's answer to the hairpin address: the other half of a hairpin
 * flow. Back to the backend as its own client, from the VIP:port it called.
 */
static __always_inline int hairpin_reply(struct ctx_buff *ctx, struct ingress *in)
{
	struct pyebpflb_ct_entry *reply, *flow;
	struct pyebpflb_ct_key key;
	union pyebpflb_addr client, vip;
	__u16 vip_port;

	ct_key_of(&key, in->pkt, PYEBPFLB_CT_REPLY);
	reply = ct_lookup_reply(&key, in->pkt, in->cfg, slot(in)->now, &flow, &in->flow_at);
	if (!reply || !(reply->flags & PYEBPFLB_CT_HAIRPIN))
		return unrelated(ctx, in, PYEBPFLB_POLICY_INGRESS);
	client = in->pkt->saddr;
	vip = reply->nat_addr;
	vip_port = reply->nat_port;
	answer_seen(ctx, in, &key, reply, flow, in->flow_at.unconfirmed);
	if (snat(ctx, in->pkt, &vip, vip_port) ||
	    rewrite_addr(ctx, in->pkt, daddr_off(in->pkt), &in->pkt->daddr, &client, 1))
		return CTX_DROP;
	frag_remember(in->pkt, &vip, &client);
	return CTX_PASS;
}

/*
 * On a backend's node: the first packet of a DSR flow another node balanced
 * here (client -> backend, the frontend in its option). The flow is recorded
 * as if this node had balanced it, so egress translates the backend's
 * answers back to the frontend: DSR_RECORDED (the packet itself then meets
 * policy as any), or NEXT_STEP when it carries no frontend.
 */
static __always_inline int dsr_arrival(struct ctx_buff *ctx, struct ingress *in)
{
	struct snat_work *w = &slot(in)->snat;
	struct packet *pkt = in->pkt;
	__u16 vip_port;

	if (!dsr_frontend(ctx, pkt, &slot(in)->dsr, &w->vip, &vip_port))
		return NEXT_STEP;
	__builtin_memset(&w->backend, 0, sizeof(w->backend));
	w->backend.addr = pkt->daddr;
	w->backend.port = pkt->dport;
	w->backend.family = pkt->family;
	/* The flow's key is the client's view (client -> frontend), as for a
	 * flow balanced here; the packet is put back as it is afterwards. */
	pkt->daddr = w->vip;
	pkt->dport = vip_port;
	ct_key_of(in->ct_key, pkt, PYEBPFLB_CT_SERVICE);
	ct_create(in->ct_key, pkt, &w->backend, 0, 0, PYEBPFLB_CT_DSR, in->cfg, slot(in)->now);
	pkt->daddr = w->backend.addr;
	pkt->dport = w->backend.port;
	return DSR_RECORDED;
}

/*
 * A backend's answer to a SNAT mapping (backend -> this node:port): back to
 * the client, from the frontend it called, and out again by the FIB.
 * NEXT_STEP when it is none (or its flow is gone: then it is unrelated).
 */
static __always_inline int snat_reply(struct ctx_buff *ctx, struct ingress *in)
{
	struct snat_work *w = &slot(in)->snat;
	struct pyebpflb_ct_entry *reply, *flow;
	struct packet *pkt = in->pkt;
	__u16 client_port, vip_port;
	int no_route = 0, verdict;

	if (!snat_reverse(pkt, slot(in)->now, &w->client, &client_port))
		return NEXT_STEP;
	ct_key_of(&w->key, pkt, PYEBPFLB_CT_REPLY);
	w->key.daddr = w->client;
	w->key.dport = client_port;
	reply = ct_lookup_reply(&w->key, pkt, in->cfg, slot(in)->now, &flow, &in->flow_at);
	if (!reply)
		return NEXT_STEP;
	w->vip = reply->nat_addr; /* copied: the entry may be reused under us */
	vip_port = reply->nat_port;
	answer_seen(ctx, in, &w->key, reply, flow, in->flow_at.unconfirmed);
	if (dnat(ctx, pkt, &w->client, client_port))
		return CTX_DROP;
	/* The packet now goes to the client: the source's rewrite starts from there. */
	pkt->daddr = w->client;
	pkt->dport = client_port;
	if (snat(ctx, pkt, &w->vip, vip_port))
		return CTX_DROP;
	verdict = fib_forward(ctx, pkt, &w->fib, &w->vip, &w->client, &no_route);
	if (no_route)
		note_drop(ctx, pkt, PYEBPFLB_POLICY_INGRESS, PYEBPFLB_DROP_NO_ROUTE, 0, 0);
	return verdict;
}

/* A later fragment of a datagram whose first was translated is translated
 * the same way, without policy (the first fragment met it); any other meets
 * policy. */
static __always_inline int later_fragment(struct ctx_buff *ctx, struct ingress *in, __u8 dir)
{
	int translated = frag_follow(ctx, in->pkt);

	if (translated < 0)
		return CTX_DROP;
	if (translated)
		return CTX_PASS;
	return unrelated(ctx, in, dir);
}

/* TCP or UDP with ports: a whole packet or a first fragment. */
static __always_inline int has_ports(const struct ingress *in)
{
	return (slot(in)->parsed == PARSE_OK ||
		(slot(in)->parsed == PARSE_FRAGMENT && in->pkt->frag == FRAG_FIRST)) &&
	       (in->pkt->proto == IPPROTO_TCP || in->pkt->proto == IPPROTO_UDP);
}

static __always_inline int lb_ingress_steps(struct ctx_buff *ctx)
{
	struct ingress in;
	int verdict;

	if (start(ctx, &in, SCRATCH_INGRESS))
		return CTX_PASS;
	if (slot(&in)->parsed == PARSE_OK &&
	    (in.pkt->proto == IPPROTO_ICMP || in.pkt->proto == IPPROTO_ICMPV6))
		return icmp_ingress(ctx, &in);
	if (slot(&in)->parsed == PARSE_FRAGMENT && in.pkt->frag == FRAG_LATER)
		return later_fragment(ctx, &in, PYEBPFLB_POLICY_INGRESS);
	if (!has_ports(&in))
		return unrelated(ctx, &in, PYEBPFLB_POLICY_INGRESS);
	if (addr_equal(&in.pkt->daddr, hairpin_addr(in.cfg, in.pkt->family)))
		return hairpin_reply(ctx, &in);
	if (!dsr_fits(in.pkt)) { /* IPv4 options or IPv6 extension headers: DSR's? */
		if (dsr_arrival(ctx, &in) == DSR_RECORDED) /* then policy, as for any packet */
			return unrelated(ctx, &in, PYEBPFLB_POLICY_INGRESS);
	}
	if (snat_candidate(in.pkt)) {
		verdict = snat_reply(ctx, &in);
		if (verdict != NEXT_STEP)
			return verdict;
	}
	verdict = follow_flow(ctx, &in);
	if (verdict == NEXT_STEP)
		verdict = new_flow(ctx, &in);
	if (verdict == REFUSE_STEP)
		return reject(ctx, in.pkt, slot(&in)->quote);
	if (verdict == SNAT_STEP)
		return snat_out(ctx, &in);
	if (verdict == DSR_STEP)
		return dsr_out(ctx, &in);
	return verdict;
}

/* A backend's answer in a live translated flow: back to the VIP as its source.
 * An answer matching a stale REPLY entry is unrelated traffic (policy). */
static __always_inline int reverse_nat(struct ctx_buff *ctx, struct ingress *out)
{
	struct pyebpflb_ct_entry *reply, *flow;
	struct pyebpflb_ct_key key;
	struct ct_place place;
	union pyebpflb_addr vip;
	__u16 vip_port;

	ct_key_of(&key, out->pkt, PYEBPFLB_CT_REPLY);
	reply = ct_lookup_reply(&key, out->pkt, out->cfg, slot(out)->now, &flow, &place);
	if (!reply)
		return unrelated(ctx, out, PYEBPFLB_POLICY_EGRESS);
	vip = reply->nat_addr; /* copied: the entry may be reused under us */
	vip_port = reply->nat_port;
	answer_seen(ctx, out, &key, reply, flow, place.unconfirmed);
	if (snat(ctx, out->pkt, &vip, vip_port))
		return CTX_DROP;
	frag_remember(out->pkt, &vip, NULL);
	return CTX_PASS;
}

/* An ICMP error about a balanced flow is part of it; anything else meets policy. */
static __always_inline int icmp_egress(struct ctx_buff *ctx, struct ingress *out)
{
	int translated = icmp_error_rev_nat(ctx, out->pkt, out->cfg, slot(out)->now);

	if (translated < 0)
		return CTX_DROP;
	if (translated)
		return CTX_PASS;
	return unrelated(ctx, out, PYEBPFLB_POLICY_EGRESS);
}

static __always_inline int lb_egress_steps(struct ctx_buff *ctx)
{
	struct ingress out;

	if (start(ctx, &out, SCRATCH_EGRESS))
		return CTX_PASS;
	if (slot(&out)->parsed == PARSE_FRAGMENT && out.pkt->frag == FRAG_LATER)
		return later_fragment(ctx, &out, PYEBPFLB_POLICY_EGRESS);
	if (slot(&out)->parsed == PARSE_OK &&
	    (out.pkt->proto == IPPROTO_ICMP || out.pkt->proto == IPPROTO_ICMPV6))
		return icmp_egress(ctx, &out);
	if (!has_ports(&out))
		return unrelated(ctx, &out, PYEBPFLB_POLICY_EGRESS);
	return reverse_nat(ctx, &out);
}

#endif
