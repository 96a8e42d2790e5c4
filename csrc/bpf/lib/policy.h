/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * L3/L4 network policy, evaluated in the programs that balance the load.
 * Semantics (docs/policy.md, and pyebpflb.policy.evaluate, the reference the
 * tests compare against): deny beats allow; among allows or among denies the
 * most specific prefix wins; what no rule matches gets the direction's
 * default. Replies of a flow policy let through, and ICMP errors about it,
 * pass without evaluation (an entry in lb_pol_ct). Nothing here runs
 * while no policy is installed.
 */
#ifndef PYEBPFLB_BPF_POLICY_H
#define PYEBPFLB_BPF_POLICY_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/ct.h"
#include "lib/events.h"
#include "lib/icmp.h"
#include "lib/config.h"
#include "lib/counters.h"
#include "lib/ctx.h"
#include "lib/parse.h"

#define ICMP_ECHO_REQUEST   8
#define ICMP_ECHO_REPLY	    0
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY   129
#define ICMPV6_LINK_FIRST   130 /* multicast listener query */
#define ICMPV6_LINK_LAST    137 /* redirect (133-137: neighbour discovery) */
#define ICMPV6_MLD2_REPORT  143

/* Flows policy let through, keyed as their answers will come (POLICY_IN,
 * POLICY_OUT entries): apart from lb_ct, so that however much other traffic
 * passes, its LRU never evicts a balanced flow (which would move it). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pyebpflb_ct_key);
	__type(value, struct pyebpflb_ct_entry);
} lb_pol_ct SEC(".maps");

/* Network policy: see lb.h. LPM tries allocate per entry (no prealloc). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* replaced whole, read under RCU */
	__type(key, __u32);
	__type(value, struct pyebpflb_policy_head);
} lb_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pyebpflb_policy_cidr_key);
	__type(value, struct pyebpflb_policy_class);
} lb_pol_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pyebpflb_policy_port_key);
	__type(value, struct pyebpflb_policy_verdict);
} lb_pol_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pyebpflb_policy_rule);
} lb_pol_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pyebpflb_policy_info);
} lb_pol_names SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pyebpflb_policy_subject_key);
	__type(value, struct pyebpflb_policy_subject);
} lb_pol_subjects SEC(".maps");

/* The subjects that are one address (prefixlen 0 in their key): one hash lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pyebpflb_policy_subject_key);
	__type(value, struct pyebpflb_policy_subject);
} lb_pol_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pyebpflb_policy_member_key);
	__type(value, struct pyebpflb_policy_member);
} lb_pol_members SEC(".maps");

/* Per-rule counters, created by a rule's first match. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pyebpflb_counter_value);
} lb_rule_stats SEC(".maps");

/* First fragments' ports, for the later fragments of the same datagram. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct pyebpflb_frag_key);
	__type(value, struct pyebpflb_frag_ports);
} lb_frags SEC(".maps");

enum policy_result {
	POLICY_PASS = 0,
	POLICY_DROP = 1,
};

static __always_inline struct pyebpflb_policy_head *
policy_head(const struct pyebpflb_lb_config *cfg)
{
	__u32 zero = 0;

	if (!cfg->policy_active)
		return NULL;
	return bpf_map_lookup_elem(&lb_policy, &zero);
}

static __always_inline __u8 policy_flags(const struct pyebpflb_policy_head *head, __u8 dir)
{
	return dir == PYEBPFLB_POLICY_INGRESS ? head->ingress : head->egress;
}

/* `flags`: the direction's; without PYEBPFLB_POLICY_SCTP_PIECES (rules compiled
 * before layout 9) SCTP is any other protocol, as it was then. */
static __always_inline __u8 policy_proto(const struct packet *pkt, int portless, __u8 flags)
{
	if (pkt->proto == IPPROTO_TCP)
		return portless ? PYEBPFLB_POLICY_TCP_NOPORT : PYEBPFLB_POLICY_TCP;
	if (pkt->proto == IPPROTO_UDP)
		return portless ? PYEBPFLB_POLICY_UDP_NOPORT : PYEBPFLB_POLICY_UDP;
	if (pkt->proto == IPPROTO_SCTP && (flags & PYEBPFLB_POLICY_SCTP_PIECES))
		return portless ? PYEBPFLB_POLICY_SCTP_NOPORT : PYEBPFLB_POLICY_SCTP;
	if (pkt->proto == IPPROTO_ICMP || pkt->proto == IPPROTO_ICMPV6)
		return PYEBPFLB_POLICY_ICMP;
	return PYEBPFLB_POLICY_OTHER;
}

/* One scope's verdict: the peer's class, then the port's range in it (in the
 * class itself when it has few, else one more lookup). */
static __always_inline void policy_lookup(__u32 gen, __u32 scope, __u8 dir,
					  const struct packet *pkt, __u8 proto, __u16 port,
					  struct pyebpflb_policy_verdict *out)
{
	struct pyebpflb_policy_cidr_key cidr_key = {
	    .prefixlen = PYEBPFLB_POLICY_CIDR_FIXED_BITS + 128,
	    .scope = (gen << PYEBPFLB_POLICY_GEN_SHIFT) | scope,
	    .dir = dir,
	    .family = pkt->family,
	    .addr = dir == PYEBPFLB_POLICY_INGRESS ? pkt->saddr : pkt->daddr,
	};
	struct pyebpflb_policy_port_key port_key = {
	    .prefixlen = PYEBPFLB_POLICY_PORT_FIXED_BITS + 16,
	    .proto = proto,
	    .port = proto == PYEBPFLB_POLICY_TCP || proto == PYEBPFLB_POLICY_UDP ||
			    proto == PYEBPFLB_POLICY_SCTP
			? port
			: 0,
	};
	struct pyebpflb_policy_verdict *found;
	struct pyebpflb_policy_class *cls;
	__u16 host_port = bpf_ntohs(port_key.port);

	out->action = PYEBPFLB_POLICY_NONE;
	out->is_default = 0;
	cls = bpf_map_lookup_elem(&lb_pol_cidrs, &cidr_key);
	if (!cls)
		return;
	if (!cls->spilled) {
#pragma unroll
		for (int i = 0; i < PYEBPFLB_POLICY_INLINE; i++) {
			const struct pyebpflb_policy_piece *piece = &cls->pieces[i];

			if ((piece->proto == proto ||
			     piece->proto == PYEBPFLB_POLICY_PIECE_EVERY) &&
			    piece->port_low <= host_port && host_port <= piece->port_high) {
				out->rule_id = piece->rule_id;
				out->action = piece->action;
				out->prefixlen = piece->prefixlen;
				return;
			}
		}
		return;
	}
	port_key.class_id = cls->class_id;
	found = bpf_map_lookup_elem(&lb_pol_ports, &port_key);
	if (found)
		*out = *found;
}

/* A policy verdict for flow events: every denial, and the allowing of a new flow. */
static __always_inline void policy_event(struct ctx_buff *ctx, const struct packet *pkt, __u8 dir,
					 const struct pyebpflb_policy_verdict *verdict,
					 __u32 service_id)
{
	struct pyebpflb_flow_event *event = event_start(ctx, pkt, PYEBPFLB_EVENT_POLICY, dir);

	if (!event)
		return;
	event->verdict = verdict->action;
	event->is_default = verdict->is_default;
	event->rule_id = verdict->rule_id;
	event->service_id = service_id;
	bpf_ringbuf_submit(event, 0);
}

/*
 * The rule set for the endpoint at `local` (the destination on ingress, the
 * source on egress, after translation): its scope and flags when a policy is for
 * it, else every endpoint's (scope 0, the direction's flags). Sets *self when
 * the endpoint talks to itself: never blocked by the policies for it.
 */
static __always_inline __u32 policy_subject(__u32 gen, __u8 dir, const struct packet *pkt,
					    const union pyebpflb_addr *local, __u8 *flags,
					    int *self)
{
	struct pyebpflb_policy_subject_key key = {
	    .gen = gen << PYEBPFLB_POLICY_GEN_SHIFT,
	    .dir = dir,
	    .family = pkt->family,
	    .addr = *local,
	};
	const union pyebpflb_addr *peer =
	    dir == PYEBPFLB_POLICY_INGRESS ? &pkt->saddr : &pkt->daddr;
	struct pyebpflb_policy_subject *found = bpf_map_lookup_elem(&lb_pol_addrs, &key);

	*self = 0;
	if (!found) {
		/* No subject is this address: the most specific subject CIDR holding it. */
		key.prefixlen = PYEBPFLB_POLICY_CIDR_FIXED_BITS + 128;
		found = bpf_map_lookup_elem(&lb_pol_subjects, &key);
	}
	if (!found)
		return 0;
	*flags = found->flags;
	*self = local->v6[0] == peer->v6[0] && local->v6[1] == peer->v6[1] &&
		local->v6[2] == peer->v6[2] && local->v6[3] == peer->v6[3];
	return found->scope;
}

/*
 * Decide on a packet of direction `dir`. `port` is its destination port after
 * translation and `local` its endpoint (the destination after translation on
 * ingress, the source on egress); a packet to a service also meets the rules
 * naming the service (`service_id`), on its VIP's port, and an endpoint with a
 * rule set the rules for every endpoint (scope 0). Of the scopes' verdicts, deny
 * beats allow, then the longer prefix wins; a tie goes to the service's rule,
 * then to the rule set's.
 */
static __always_inline int policy_decide(struct ctx_buff *ctx,
					 const struct pyebpflb_policy_head *head, __u8 dir,
					 const struct packet *pkt, const union pyebpflb_addr *local,
					 __u32 service_id, __u16 port, int portless,
					 struct pyebpflb_policy_verdict *verdict)
{
	__u8 head_flags = policy_flags(head, dir);
	__u8 flags = head_flags, proto = policy_proto(pkt, portless, flags);
	struct pyebpflb_policy_verdict other = {};
	__u32 scope = 0;
	int self = 0;

	verdict->action = PYEBPFLB_POLICY_NONE;
	verdict->is_default = 0;
	if (!(flags & PYEBPFLB_POLICY_ON))
		return POLICY_PASS;
	if (flags & PYEBPFLB_POLICY_SUBJECTS) {
		__u8 service_rules = flags & PYEBPFLB_POLICY_SERVICE_RULES;

		scope = policy_subject(head->gen, dir, pkt, local, &flags, &self);
		flags |= service_rules;
		if (self) {
			verdict->action = PYEBPFLB_POLICY_ALLOW;
			verdict->rule_id = 0;
			return POLICY_PASS;
		}
	}
	policy_lookup(head->gen, scope, dir, pkt, proto, port, verdict);
	if (scope && (head_flags & PYEBPFLB_POLICY_EVERYONE)) {
		/* The rules for every endpoint: a tie goes to the endpoint's own rule set. */
		policy_lookup(head->gen, 0, dir, pkt, proto, port, &other);
		if (other.action != PYEBPFLB_POLICY_NONE &&
		    (other.action > verdict->action ||
		     (other.action == verdict->action && other.prefixlen > verdict->prefixlen)))
			*verdict = other;
	}
	if (service_id && (flags & PYEBPFLB_POLICY_SERVICE_RULES)) {
		policy_lookup(head->gen, service_id, dir, pkt, proto, pkt->dport, &other);
		if (other.action != PYEBPFLB_POLICY_NONE &&
		    (other.action > verdict->action ||
		     (other.action == verdict->action && other.prefixlen >= verdict->prefixlen)))
			*verdict = other;
	}
	if (verdict->action != PYEBPFLB_POLICY_NONE && !pkt->dry)
		count_or_create(&lb_rule_stats, &verdict->rule_id, ctx_len(ctx));
	if (verdict->action == PYEBPFLB_POLICY_NONE) {
		/* The default decided: rule id 0. */
		verdict->rule_id = 0;
		verdict->action = flags & PYEBPFLB_POLICY_DEFAULT_DENY ? PYEBPFLB_POLICY_DENY
								       : PYEBPFLB_POLICY_ALLOW;
		verdict->is_default = 1;
	}
	explain(ctx, pkt, PYEBPFLB_EXPLAIN_RULE, verdict->rule_id);
	explain(ctx, pkt, PYEBPFLB_EXPLAIN_POLICY,
		(1 + verdict->action) | (verdict->is_default ? PYEBPFLB_EXPLAIN_DEFAULT : 0));
	if (verdict->action == PYEBPFLB_POLICY_DENY) {
		policy_event(ctx, pkt, dir, verdict, service_id);
		note_drop(ctx, pkt, dir, PYEBPFLB_DROP_POLICY_DENIED, service_id, verdict->rule_id);
		return POLICY_DROP;
	}
	return POLICY_PASS;
}

static __always_inline int icmp_type(const struct packet *pkt)
{
	return ((__u8 *)&pkt->sport)[0];
}

/*
 * The key under which `pkt`'s flow is tracked for policy, as its answers
 * will look (`reverse`: from the other side) or as `pkt` is. ICMP echo is
 * tracked by its identifier. 0 when the packet has no trackable flow.
 */
static __always_inline int policy_ct_key(struct pyebpflb_ct_key *key, const struct packet *pkt,
					 __u8 ct_dir, int reverse)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->proto = pkt->proto;
	key->family = pkt->family;
	key->dir = ct_dir;
	key->saddr = reverse ? pkt->daddr : pkt->saddr;
	key->daddr = reverse ? pkt->saddr : pkt->daddr;
	if (pkt->proto == IPPROTO_TCP || pkt->proto == IPPROTO_UDP || pkt->proto == IPPROTO_SCTP) {
		key->sport = reverse ? pkt->dport : pkt->sport;
		key->dport = reverse ? pkt->sport : pkt->dport;
		return 1;
	}
	if (pkt->proto == IPPROTO_ICMP || pkt->proto == IPPROTO_ICMPV6) {
		int type = icmp_type(pkt);
		int request = pkt->proto == IPPROTO_ICMP ? ICMP_ECHO_REQUEST : ICMPV6_ECHO_REQUEST;
		int reply = pkt->proto == IPPROTO_ICMP ? ICMP_ECHO_REPLY : ICMPV6_ECHO_REPLY;

		key->sport = pkt->icmp_id;
		return pkt->frag != FRAG_LATER && type == (reverse ? request : reply);
	}
	return 0;
}

/* Remember a flow policy let through, so that its answers pass the other way;
 * the first packet of a flow a policy decided on makes a policy event. */
static __always_inline void policy_ct_record(struct ctx_buff *ctx, const struct packet *pkt,
					     __u8 dir, __u8 answer_dir, __u64 now,
					     const struct pyebpflb_policy_verdict *verdict)
{
	struct pyebpflb_ct_key key;
	struct pyebpflb_ct_entry *entry;

	/* A reset opens nothing to answer (the datapath's own refusals among them). */
	if (pkt->dry || pkt->frag || !policy_ct_key(&key, pkt, answer_dir, 1) ||
	    (pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & TCP_FLAG_RST)))
		return;
	entry = bpf_map_lookup_elem(&lb_pol_ct, &key);
	if (entry) {
		ct_touch(entry, pkt, now, 0);
	} else {
		struct pyebpflb_ct_entry fresh = {.created_ns = now, .last_seen_ns = now};

		ct_touch(&fresh, pkt, now, 0);
		bpf_map_update_elem(&lb_pol_ct, &key, &fresh, BPF_ANY);
		if (verdict->action != PYEBPFLB_POLICY_NONE)
			policy_event(ctx, pkt, dir, verdict, 0);
	}
}

/* Is `pkt` an answer to a flow recorded for `answer_dir`, or an ICMP error about one? */
static __always_inline int policy_ct_answer(struct ctx_buff *ctx, const struct packet *pkt,
					    __u8 answer_dir, const struct pyebpflb_lb_config *cfg,
					    __u64 now)
{
	struct pyebpflb_ct_key key;
	struct pyebpflb_ct_entry *entry;

	if (pkt->proto == IPPROTO_ICMP || pkt->proto == IPPROTO_ICMPV6) {
		struct icmp_quote quote;
		struct ct_place place;

		if (!pkt->frag && !icmp_quoted_key(ctx, pkt, &key, &quote)) {
			/* About a flow we let through, or (ingress) one we balance. */
			key.dir = answer_dir;
			if (bpf_map_lookup_elem(&lb_pol_ct, &key))
				return 1;
			key.dir = PYEBPFLB_CT_SERVICE;
			return answer_dir == PYEBPFLB_CT_POLICY_IN && ct_find(&key, &place) != NULL;
		}
	}
	if (!policy_ct_key(&key, pkt, answer_dir, 0))
		return 0;
	entry = bpf_map_lookup_elem(&lb_pol_ct, &key);
	if (!entry)
		return 0;
	if (now - entry->last_seen_ns > ct_lifetime(cfg, entry, pkt->proto)) {
		if (!pkt->dry)
			bpf_map_delete_elem(&lb_pol_ct, &key);
		return 0;
	}
	ct_touch(entry, pkt, now, 1);
	return 1;
}

/*
 * A fragment: the first one records its ports for the rest of its datagram;
 * a later one takes them from there. 1 when the ports are known.
 */
static __always_inline int policy_fragment_ports(struct packet *pkt)
{
	struct pyebpflb_frag_key key = {
	    .saddr = pkt->saddr,
	    .daddr = pkt->daddr,
	    .id = pkt->frag_id,
	    .proto = pkt->proto,
	    .family = pkt->family,
	};
	struct pyebpflb_frag_ports *known;

	if (pkt->frag == FRAG_FIRST) {
		struct pyebpflb_frag_ports ports = {.sport = pkt->sport, .dport = pkt->dport};

		if (!pkt->dry)
			bpf_map_update_elem(&lb_frags, &key, &ports, BPF_ANY);
		return 1;
	}
	known = bpf_map_lookup_elem(&lb_frags, &key);
	if (!known)
		return 0;
	pkt->sport = known->sport;
	pkt->dport = known->dport;
	return 1;
}

/*
 * Policy for a packet that is not part of a balanced flow, in direction `dir`
 * (`parsed`: what parse_packet said). Answers to flows policy let through pass;
 * anything else is decided by the rules, and when let through, recorded so
 * that its answers pass the other way.
 */
static __always_inline int policy_enforce(struct ctx_buff *ctx,
					  const struct pyebpflb_policy_head *head, __u8 dir,
					  struct packet *pkt, int parsed,
					  const struct pyebpflb_lb_config *cfg, __u64 now)
{
	__u8 answer_dir =
	    dir == PYEBPFLB_POLICY_INGRESS ? PYEBPFLB_CT_POLICY_IN : PYEBPFLB_CT_POLICY_OUT;
	__u8 other_dir =
	    dir == PYEBPFLB_POLICY_INGRESS ? PYEBPFLB_CT_POLICY_OUT : PYEBPFLB_CT_POLICY_IN;
	struct pyebpflb_policy_verdict verdict;
	int on = policy_flags(head, dir) & PYEBPFLB_POLICY_ON, portless = 0;

	if (parsed == PARSE_NOT_OURS)
		return CTX_PASS; /* not IP */
	if (parsed == PARSE_MALFORMED || parsed == PARSE_UNSUPPORTED) {
		if (!on)
			return CTX_PASS;
		note_drop(ctx, pkt, dir,
			  parsed == PARSE_MALFORMED ? PYEBPFLB_DROP_MALFORMED
						    : PYEBPFLB_DROP_UNSUPPORTED,
			  0, 0);
		return CTX_DROP;
	}
	/* IPv6 needs neighbour and multicast listener discovery on the link: no
	 * policy stops them. */
	if (parsed == PARSE_OK && pkt->proto == IPPROTO_ICMPV6 &&
	    ((icmp_type(pkt) >= ICMPV6_LINK_FIRST && icmp_type(pkt) <= ICMPV6_LINK_LAST) ||
	     icmp_type(pkt) == ICMPV6_MLD2_REPORT))
		return CTX_PASS;
	if (parsed == PARSE_FRAGMENT && pkt->proto != IPPROTO_ICMP && pkt->proto != IPPROTO_ICMPV6)
		portless = !policy_fragment_ports(pkt);
	if (on && !portless && policy_ct_answer(ctx, pkt, answer_dir, cfg, now))
		return CTX_PASS;
	if (policy_decide(ctx, head, dir, pkt,
			  dir == PYEBPFLB_POLICY_INGRESS ? &pkt->daddr : &pkt->saddr, 0, pkt->dport,
			  portless, &verdict) == POLICY_DROP)
		return CTX_DROP;
	policy_ct_record(ctx, pkt, dir, other_dir, now, &verdict);
	return CTX_PASS;
}

#endif
