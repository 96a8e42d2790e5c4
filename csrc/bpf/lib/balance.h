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
#include "lib/events.h"
#include "lib/icmp.h"
#include "lib/keep.h"
#include "lib/nat.h"
#include "lib/node.h"
#include "lib/parse.h"
#include "lib/policy.h"
#include "lib/select.h"
#include "lib/service.h"

/* A step that did not decide the packet's fate: go on to the next. */
#define NEXT_STEP (-100)
/* A step that refuses the packet: the caller sends the refusal (reject()),
 * from one place, so the refusal's buffers are on the stack once. */
#define REFUSE_STEP (-101)

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
 * Send the packet to its backend. A hairpin flow (the client is the backend
 * itself: a pod calling its own service) also gets the datapath's hairpin
 * address as its source, as Cilium's service loopback address does: the
 * backend would drop a packet from its own address arriving from outside,
 * and its answer must come back through the datapath to be translated.
 */
static __always_inline int dnat_to(struct ctx_buff *ctx, const struct ingress *in,
				   const union pyebpflb_addr *addr, __u16 port, int hairpin)
{
	const struct packet *pkt = in->pkt;

	const union pyebpflb_addr *source = hairpin ? hairpin_addr(in->cfg, pkt->family) : NULL;

	if (dnat(ctx, pkt, addr, port))
		return CTX_DROP;
	if (source && rewrite_addr(ctx, pkt, saddr_off(pkt), &pkt->saddr, source, 1))
		return CTX_DROP;
	frag_remember(pkt, source, addr);
	return CTX_PASS;
}

/* Policy on a packet of a service flow: the rules naming the service, and the
 * others on its real destination. The first packet of a flow it lets through
 * makes a policy event. */
static __always_inline int service_denied(struct ctx_buff *ctx, const struct ingress *in,
					  __u32 service_id, __u16 port, int new_flow)
{
	struct pyebpflb_policy_verdict verdict;

	if (!in->policy)
		return 0;
	if (policy_decide(ctx, in->policy, PYEBPFLB_POLICY_INGRESS, in->pkt, service_id, port, 0,
			  &verdict) == POLICY_DROP)
		return 1;
	if (new_flow && verdict.action != PYEBPFLB_POLICY_NONE)
		policy_event(ctx, in->pkt, PYEBPFLB_POLICY_INGRESS, &verdict, service_id);
	return 0;
}

/* Policy allowing, record the new flow (and the client's choice, for `svc`
 * under session affinity) and send it to its backend. NEXT_STEP when a live
 * flow holds that backend's side of the tuple. */
static __always_inline int admit(struct ctx_buff *ctx, struct ingress *in,
				 const struct pyebpflb_backend *backend, __u32 backend_id,
				 __u32 service_id, const struct pyebpflb_service *svc)
{
	int err =
	    ct_create(in->ct_key, in->pkt, backend, backend_id, service_id, in->cfg, slot(in)->now);

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
	return dnat_to(ctx, in, &backend->addr, backend->port,
		       addr_equal(&backend->addr, &in->pkt->saddr));
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

	/* The old flow goes, both halves (it may sit in another map than new flows start in). */
	ct_delete_flow(in->flow_at.map, in->ct_key, flow, in->pkt, in->cfg);
	if (!copy_backend(in, backend_id))
		return NEXT_STEP;
	if (service_denied(ctx, in, service_id, slot(in)->backend.port, 1))
		return CTX_DROP;
	return admit(ctx, in, &slot(in)->backend, backend_id, service_id, NULL);
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
	if (service_denied(ctx, in, flow->service_id, flow->nat_port, 0))
		return CTX_DROP;
	ct_heal_reply(in->flow_at.map, in->ct_key, flow, pkt, in->cfg, slot(in)->now);
	ct_touch(live, pkt, slot(in)->now, 0);
	explain(ctx, pkt, PYEBPFLB_EXPLAIN_BACKEND, flow->backend_id);
	if (!pkt->dry) {
		count_traffic(&lb_svc_stats, flow->service_id, ctx_len(ctx));
		count_traffic(&lb_be_stats, flow->backend_id, ctx_len(ctx));
	}
	return dnat_to(ctx, in, &flow->nat_addr, flow->nat_port, flow->flags & PYEBPFLB_CT_HAIRPIN);
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
	backend_id = select_backend(svc, in->pkt, in->cfg, slot(in)->now, &backend);
	if (!backend_id && svc->count) {
		/* An update removed the chosen backend between our reads; the
		 * service entry has moved on to a complete new set: read it again. */
		if (!copy_service(in))
			return CTX_PASS;
		backend_id = svc->count ? slot_backend(svc, in->pkt, 0, &backend) : 0;
	}
	backend = backend ? keep_backend(in, backend) : NULL;
	/* Without a backend, the rules on the real destination see the VIP's port. */
	if (service_denied(ctx, in, svc->id, backend ? backend->port : in->pkt->dport, 1))
		return CTX_DROP;
	if (!backend_id || !backend)
		return refuse(ctx, in, svc->id);
	verdict = admit(ctx, in, backend, backend_id, svc->id, svc);
	if (verdict != NEXT_STEP)
		return verdict;
	/* A live flow from this client address and port holds the chosen backend's
	 * side of the tuple (through another service): one more draw. */
	backend_id = slot_backend(svc, in->pkt, 1, &backend);
	backend = backend ? keep_backend(in, backend) : NULL;
	if (backend_id && backend) {
		verdict = admit(ctx, in, backend, backend_id, svc->id, svc);
		if (verdict != NEXT_STEP)
			return verdict;
	}
	note_drop(ctx, in->pkt, PYEBPFLB_POLICY_INGRESS, PYEBPFLB_DROP_TUPLE_IN_USE, svc->id, 0);
	return CTX_DROP;
}

/* An ICMP error about a balanced flow, sent to its VIP (path MTU discovery
 * through the load balancer), goes on to the backend; anything else meets
 * policy. */
static __always_inline int icmp_ingress(struct ctx_buff *ctx, struct ingress *in)
{
	int translated = icmp_error_dnat(ctx, in->pkt, in->cfg, slot(in)->now);

	if (translated < 0)
		return CTX_DROP;
	if (translated)
		return CTX_PASS;
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
	if (!in->pkt->dry) {
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
	verdict = follow_flow(ctx, &in);
	if (verdict == NEXT_STEP)
		verdict = new_flow(ctx, &in);
	if (verdict == REFUSE_STEP)
		return reject(ctx, in.pkt);
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
