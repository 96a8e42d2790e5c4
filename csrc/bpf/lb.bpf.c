// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Service load balancer on tc. Ingress of the attached interface translates
 * packets for a service VIP:port to a backend (DNAT) and records the flow;
 * egress translates the backends' replies back (reverse NAT), so the client
 * only ever sees the VIP. Anything else passes untouched.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/ct.h"
#include "lib/events.h"
#include "lib/icmp.h"
#include "lib/maps.h"
#include "lib/nat.h"
#include "lib/parse.h"
#include "lib/policy.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline struct pyebpflb_lb_config *config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&lb_config, &zero);
}

/*
 * A backend of the service's current generation, drawn by weight: a uniform
 * slot, then the alias draw. The generation's slots were complete before the
 * service entry pointing at them was written, so every slot up to `count`
 * exists.
 */
static __always_inline __u32 select_backend(const struct pyebpflb_service *svc,
					    struct pyebpflb_backend **backend)
{
	struct pyebpflb_slot_key key = {.service_id = svc->id};
	struct pyebpflb_slot *slot;
	__u32 backend_id;

	key.slot =
	    ((__u32)svc->gen << PYEBPFLB_SLOT_GEN_SHIFT) | (bpf_get_prandom_u32() % svc->count + 1);
	slot = bpf_map_lookup_elem(&lb_slots, &key);
	if (!slot)
		return 0;
	backend_id = bpf_get_prandom_u32() < slot->threshold ? slot->backend_id : slot->alias_id;
	*backend = bpf_map_lookup_elem(&lb_backends, &backend_id);
	return *backend ? backend_id : 0;
}

/* MurmurHash3's mixing steps: the same flow hashes alike on every host. */
static __always_inline __u32 hash_word(__u32 hash, __u32 word)
{
	word *= 0xcc9e2d51;
	word = (word << 15) | (word >> 17);
	word *= 0x1b873593;
	hash ^= word;
	hash = (hash << 13) | (hash >> 19);
	return hash * 5 + 0xe6546b64;
}

static __always_inline __u32 hash_final(__u32 hash)
{
	hash ^= hash >> 16;
	hash *= 0x85ebca6b;
	hash ^= hash >> 13;
	hash *= 0xc2b2ae35;
	return hash ^ (hash >> 16);
}

/* The flow's hash, or only its source address's under session affinity. */
static __always_inline __u32 flow_hash(const struct packet *pkt, int source_only)
{
	__u32 hash = 0x5eed;

	for (int i = 0; i < 4; i++)
		hash = hash_word(hash, pkt->saddr.v6[i]);
	if (source_only)
		return hash_final(hash);
	for (int i = 0; i < 4; i++)
		hash = hash_word(hash, pkt->daddr.v6[i]);
	hash = hash_word(hash, ((__u32)pkt->sport << 16) | pkt->dport);
	hash = hash_word(hash, pkt->proto);
	return hash_final(hash);
}

/* Maglev: the table slot the flow's hash falls in. Several load balancers with
 * the same backends send a flow to the same backend. */
static __always_inline __u32 maglev_backend(const struct pyebpflb_service *svc,
					    const struct packet *pkt,
					    const struct pyebpflb_lb_config *cfg,
					    struct pyebpflb_backend **backend)
{
	void *table = bpf_map_lookup_elem(&lb_maglev, &svc->id);
	__u32 slot, *backend_id;

	if (!table || !cfg->maglev_table_size)
		return 0;
	slot = flow_hash(pkt, svc->affinity_timeout_s != 0) % cfg->maglev_table_size;
	backend_id = bpf_map_lookup_elem(table, &slot);
	if (!backend_id || !*backend_id)
		return 0;
	*backend = bpf_map_lookup_elem(&lb_backends, backend_id);
	return *backend ? *backend_id : 0;
}

/*
 * Session affinity (Kubernetes' ClientIP): a new flow from a client goes to the
 * backend of the client's last new flow, while that backend still takes new
 * flows and the client came back within the timeout.
 */
static __always_inline __u32 affinity_backend(const struct pyebpflb_service *svc,
					      const struct packet *pkt, __u64 now,
					      struct pyebpflb_backend **backend)
{
	struct pyebpflb_affinity_key key = {
	    .client = pkt->saddr, .service_id = svc->id, .family = pkt->family};
	struct pyebpflb_affinity *last = bpf_map_lookup_elem(&lb_affinity, &key);
	__u32 backend_id;

	if (!last || now - last->last_seen_ns > (__u64)svc->affinity_timeout_s * 1000000000ULL)
		return 0;
	backend_id = last->backend_id;
	*backend = bpf_map_lookup_elem(&lb_backends, &backend_id);
	if (!*backend || !(*backend)->usable)
		return 0;
	return backend_id;
}

static __always_inline void remember_affinity(const struct pyebpflb_service *svc,
					      const struct packet *pkt, __u32 backend_id, __u64 now)
{
	struct pyebpflb_affinity_key key = {
	    .client = pkt->saddr, .service_id = svc->id, .family = pkt->family};
	struct pyebpflb_affinity value = {.backend_id = backend_id, .last_seen_ns = now};

	bpf_map_update_elem(&lb_affinity, &key, &value, BPF_ANY);
}

static __always_inline int dnat_to(struct __sk_buff *skb, const struct packet *pkt,
				   const union pyebpflb_addr *addr, __u16 port)
{
	if (dnat(skb, pkt, addr, port))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

/* Policy on a packet of a service flow: the rules naming the service, and the
 * others on its real destination. The first packet of a flow it lets through
 * makes a policy event. */
static __always_inline int service_denied(struct __sk_buff *skb,
					  const struct pyebpflb_policy_head *head,
					  const struct packet *pkt, __u32 service_id, __u16 port,
					  int new_flow)
{
	struct pyebpflb_policy_verdict verdict;

	if (!head)
		return 0;
	if (policy_decide(skb, head, PYEBPFLB_POLICY_INGRESS, pkt, service_id, port, 0, &verdict) ==
	    POLICY_DROP)
		return 1;
	if (new_flow && verdict.action != PYEBPFLB_POLICY_NONE)
		policy_event(skb, pkt, PYEBPFLB_POLICY_INGRESS, &verdict, service_id);
	return 0;
}

/* A new flow, translated: counted, and a trace event. */
static __always_inline void note_new_flow(struct __sk_buff *skb, const struct packet *pkt,
					  const struct pyebpflb_backend *backend, __u32 service_id,
					  __u32 backend_id)
{
	struct pyebpflb_flow_event *event;

	explain(skb, pkt, PYEBPFLB_EXPLAIN_SERVICE, service_id);
	explain(skb, pkt, PYEBPFLB_EXPLAIN_BACKEND, backend_id);
	if (pkt->dry)
		return;
	count_new_flow(&lb_svc_stats, service_id, skb->len);
	count_new_flow(&lb_be_stats, backend_id, skb->len);
	event = event_start(skb, pkt, PYEBPFLB_EVENT_TRACE, PYEBPFLB_POLICY_INGRESS);
	if (!event)
		return;
	event->nat_addr = backend->addr;
	event->nat_port = backend->port;
	event->service_id = service_id;
	event->backend_id = backend_id;
	bpf_ringbuf_submit(event, 0);
}

/*
 * Explain (Datapath.explain) runs a packet through BPF_PROG_TEST_RUN with
 * this mark: the program decides as for real traffic but writes no map
 * (no conntrack, counter, affinity or event) and reports what it decided in
 * skb->cb. Test runs come in on the loopback device (ifindex 1), where the
 * datapath is never attached, so real traffic never takes this path.
 */

static __always_inline int explaining(const struct __sk_buff *skb)
{
	return skb->mark == PYEBPFLB_EXPLAIN_MARK && skb->ifindex == 1;
}

SEC("tc")
int lb_ingress(struct __sk_buff *skb)
{
	struct pyebpflb_service_key svc_key = {};
	struct pyebpflb_policy_head *policy;
	struct pyebpflb_ct_key ct_key;
	struct pyebpflb_lb_config *cfg;
	struct pyebpflb_ct_entry *flow;
	struct pyebpflb_backend *backend = NULL;
	struct pyebpflb_service *svc;
	struct packet pkt;
	__u32 backend_id;
	int parsed;
	__u64 now;

	parsed = parse_packet(skb, &pkt);
	pkt.dry = explaining(skb);
	cfg = config();
	if (!cfg)
		return TC_ACT_OK;
	/* Jiffy resolution is plenty for timeouts of seconds, at a fraction of the cost. */
	now = bpf_ktime_get_coarse_ns();
	policy = policy_head(cfg);
	if (parsed != PARSE_OK || (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP)) {
		if (policy)
			return policy_enforce(skb, policy, PYEBPFLB_POLICY_INGRESS, &pkt, parsed,
					      cfg, now);
		return TC_ACT_OK;
	}

	/* A packet of a known flow goes where the flow went. */
	ct_key_of(&ct_key, &pkt, PYEBPFLB_CT_SERVICE);
	flow = ct_lookup_service(&ct_key, &pkt, cfg, now);
	if (flow && ct_reopens(flow, &pkt)) {
		/*
		 * A new connection on a reused client port goes to the backend the
		 * old one had, while that backend is in the service: its TCP stack
		 * knows the tuple (TIME_WAIT) and handles the reuse, as it would
		 * without a load balancer. Another backend would meet the old
		 * connection's stray segments and the client's resets for them.
		 */
		__u32 reuse_id = flow->backend_id, service_id = flow->service_id;

		backend = bpf_map_lookup_elem(&lb_backends, &reuse_id);
		if (backend) {
			if (service_denied(skb, policy, &pkt, service_id, backend->port, 1))
				return TC_ACT_SHOT;
			if (ct_create(&ct_key, &pkt, backend, reuse_id, service_id, now)) {
				note_drop(skb, &pkt, PYEBPFLB_POLICY_INGRESS, PYEBPFLB_DROP_CT_FULL,
					  service_id, 0);
				return TC_ACT_SHOT;
			}
			note_new_flow(skb, &pkt, backend, service_id, reuse_id);
			return dnat_to(skb, &pkt, &backend->addr, backend->port);
		}
		if (!pkt.dry)
			bpf_map_delete_elem(&lb_ct, &ct_key);
	} else if (flow) {
		/*
		 * A TCP connection whose backend left the service finishes where it
		 * is (the entry remembers the address), as with kube-proxy: only new
		 * connections avoid the backend. A UDP flow has no end to wait for,
		 * so it moves to a backend of the service, as kube-proxy makes it by
		 * clearing the conntrack entries of removed endpoints.
		 */
		if (pkt.proto == IPPROTO_TCP ||
		    bpf_map_lookup_elem(&lb_backends, &flow->backend_id)) {
			/* Policy holds for every packet: a new deny ends a flow at once. */
			explain(skb, &pkt, PYEBPFLB_EXPLAIN_SERVICE, flow->service_id);
			if (service_denied(skb, policy, &pkt, flow->service_id, flow->nat_port, 0))
				return TC_ACT_SHOT;
			ct_touch(flow, &pkt, now, 0);
			explain(skb, &pkt, PYEBPFLB_EXPLAIN_SERVICE, flow->service_id);
			explain(skb, &pkt, PYEBPFLB_EXPLAIN_BACKEND, flow->backend_id);
			if (!pkt.dry) {
				count_traffic(&lb_svc_stats, flow->service_id, skb->len);
				count_traffic(&lb_be_stats, flow->backend_id, skb->len);
			}
			return dnat_to(skb, &pkt, &flow->nat_addr, flow->nat_port);
		}
		if (!pkt.dry)
			bpf_map_delete_elem(&lb_ct, &ct_key);
	}

	svc_key.vip = pkt.daddr;
	svc_key.port = pkt.dport;
	svc_key.proto = pkt.proto;
	svc_key.family = pkt.family;
	svc = bpf_map_lookup_elem(&lb_services, &svc_key);
	if (!svc) {
		if (policy)
			return policy_enforce(skb, policy, PYEBPFLB_POLICY_INGRESS, &pkt, parsed,
					      cfg, now);
		return TC_ACT_OK;
	}
	explain(skb, &pkt, PYEBPFLB_EXPLAIN_SERVICE, svc->id);
	backend_id = 0;
	if (svc->count && (svc->flags & PYEBPFLB_SERVICE_MAGLEV)) {
		/* Under affinity Maglev hashes the client's address alone: that is the
		 * affinity, with no state, and the same on every load balancer. */
		backend_id = maglev_backend(svc, &pkt, cfg, &backend);
	} else if (svc->count) {
		if (svc->affinity_timeout_s)
			backend_id = affinity_backend(svc, &pkt, now, &backend);
		if (!backend_id)
			backend_id = select_backend(svc, &backend);
	}
	if (!backend_id && svc->count) {
		/* An update removed the chosen backend between our reads; the
		 * service entry has moved on to a complete new set: read it again. */
		svc = bpf_map_lookup_elem(&lb_services, &svc_key);
		if (!svc)
			return TC_ACT_OK;
		backend_id = svc->count ? select_backend(svc, &backend) : 0;
	}
	/* Without a backend, the rules on the real destination see the VIP's port. */
	if (service_denied(skb, policy, &pkt, svc->id, backend ? backend->port : pkt.dport, 1))
		return TC_ACT_SHOT;
	if (!backend_id || !backend) {
		explain(skb, &pkt, PYEBPFLB_EXPLAIN_SERVICE, svc->id);
		if (!pkt.dry)
			count_new_flow(&lb_svc_stats, svc->id, skb->len);
		note_drop(skb, &pkt, PYEBPFLB_POLICY_INGRESS, PYEBPFLB_DROP_NO_BACKEND, svc->id, 0);
		return reject(skb, &pkt);
	}
	if (ct_create(&ct_key, &pkt, backend, backend_id, svc->id, now)) {
		note_drop(skb, &pkt, PYEBPFLB_POLICY_INGRESS, PYEBPFLB_DROP_CT_FULL, svc->id, 0);
		return TC_ACT_SHOT;
	}
	if (svc->affinity_timeout_s && !(svc->flags & PYEBPFLB_SERVICE_MAGLEV) && !pkt.dry)
		remember_affinity(svc, &pkt, backend_id, now);
	note_new_flow(skb, &pkt, backend, svc->id, backend_id);
	return dnat_to(skb, &pkt, &backend->addr, backend->port);
}

SEC("tc")
int lb_egress(struct __sk_buff *skb)
{
	struct pyebpflb_policy_head *policy;
	struct pyebpflb_ct_entry *reply, *flow;
	struct pyebpflb_lb_config *cfg;
	struct pyebpflb_ct_key key;
	struct packet pkt;
	int parsed;

	parsed = parse_packet(skb, &pkt);
	pkt.dry = explaining(skb);
	cfg = config();
	if (!cfg)
		return TC_ACT_OK;
	policy = policy_head(cfg);
	if (parsed != PARSE_OK) {
		if (policy)
			return policy_enforce(skb, policy, PYEBPFLB_POLICY_EGRESS, &pkt, parsed,
					      cfg, bpf_ktime_get_coarse_ns());
		return TC_ACT_OK;
	}
	if (pkt.proto == IPPROTO_ICMP || pkt.proto == IPPROTO_ICMPV6) {
		/* An error about a balanced flow is part of it; anything else meets policy. */
		int translated = icmp_error_rev_nat(skb, &pkt);

		if (translated < 0)
			return TC_ACT_SHOT;
		if (translated || !policy)
			return TC_ACT_OK;
		return policy_enforce(skb, policy, PYEBPFLB_POLICY_EGRESS, &pkt, parsed, cfg,
				      bpf_ktime_get_coarse_ns());
	}

	ct_key_of(&key, &pkt, PYEBPFLB_CT_REPLY);
	reply = bpf_map_lookup_elem(&lb_ct, &key);
	if (!reply) {
		if (policy)
			return policy_enforce(skb, policy, PYEBPFLB_POLICY_EGRESS, &pkt, parsed,
					      cfg, bpf_ktime_get_coarse_ns());
		return TC_ACT_OK;
	}
	/* The flow's life is kept on its SERVICE entry; replies refresh it too. */
	flow = ct_lookup_service_of_reply(&pkt, reply);
	if (flow)
		ct_touch(flow, &pkt, bpf_ktime_get_coarse_ns(), PYEBPFLB_CT_SEEN_REPLY);
	if (snat(skb, &pkt, &reply->nat_addr, reply->nat_port))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}
