/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Connection tracking for translated flows. A flow has two entries: SERVICE,
 * keyed by the client's packet as it arrives (client -> VIP), and REPLY,
 * keyed by the backend's answer (backend -> client). The two have one life:
 * the SERVICE entry holds it (both directions refresh it, and it alone
 * expires), and a REPLY entry counts only while the SERVICE entry it points
 * back to is alive and sends the flow to that very backend. Whoever deletes
 * a flow deletes both entries (ct_delete_flow); a REPLY entry left by a flow
 * that is gone (the LRU evicted its SERVICE half) is found stale and removed
 * by the next packet that meets it, which then counts as unrelated traffic.
 *
 * One REPLY key can serve one flow: two flows from one client address and
 * port to one backend address and port would be one connection to the
 * backend. A new flow takes the key over from a flow that is closing or gone
 * (a client reusing its port), never from a live one (ct_create says
 * CT_TUPLE_IN_USE, and the caller picks another backend).
 */
#ifndef PYEBPFLB_BPF_CT_H
#define PYEBPFLB_BPF_CT_H

#include <linux/bpf.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/config.h"
#include "lib/parse.h"

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/*
 * Both entries of a flow live in one of three LRU maps, so that pressure on
 * one kind cannot evict another (as Cilium's TCP and "any" maps, and
 * nf_conntrack's early drop of unassured entries): lb_ct holds TCP flows
 * the backend has answered, lb_ct_syn TCP flows it has not (yet) answered,
 * where a SYN flood, spoofed or not, only evicts its own kind, and
 * lb_ct_udp the rest. A TCP flow is created in lb_ct_syn and moves to
 * lb_ct with the backend's first answer (ct_confirm). Sizes are set by
 * user space (max_conntrack, max_conntrack_syn, max_conntrack_udp).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct pyebpflb_ct_key);
	__type(value, struct pyebpflb_ct_entry);
} lb_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pyebpflb_ct_key);
	__type(value, struct pyebpflb_ct_entry);
} lb_ct_syn SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct pyebpflb_ct_key);
	__type(value, struct pyebpflb_ct_entry);
} lb_ct_udp SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PYEBPFLB_CT_TABLES);
	__type(key, __u32);
	__type(value, struct pyebpflb_ct_stats);
} lb_ct_stats SEC(".maps");

/* The counters of the table flows of `proto` live in (`unconfirmed`: lb_ct_syn). */
static __always_inline struct pyebpflb_ct_stats *ct_stats(__u8 proto, int unconfirmed)
{
	__u32 table = proto != IPPROTO_TCP ? PYEBPFLB_CT_UDP
		      : unconfirmed	   ? PYEBPFLB_CT_TCP_SYN
					   : PYEBPFLB_CT_TCP;

	return bpf_map_lookup_elem(&lb_ct_stats, &table);
}

/* Where an entry was found: its map, and whether that is lb_ct_syn. */
struct ct_place {
	void *map;
	int unconfirmed;
};

/* The entry under `key` in whichever map holds its kind of flow. */
static __always_inline struct pyebpflb_ct_entry *ct_find(const struct pyebpflb_ct_key *key,
							 struct ct_place *place)
{
	struct pyebpflb_ct_entry *entry;

	place->unconfirmed = 0;
	if (key->proto != IPPROTO_TCP) {
		place->map = &lb_ct_udp;
		return bpf_map_lookup_elem(&lb_ct_udp, key);
	}
	place->map = &lb_ct;
	entry = bpf_map_lookup_elem(&lb_ct, key);
	if (entry)
		return entry;
	place->map = &lb_ct_syn;
	place->unconfirmed = 1;
	return bpf_map_lookup_elem(&lb_ct_syn, key);
}

static __always_inline void ct_key_of(struct pyebpflb_ct_key *key, const struct packet *pkt,
				      __u8 dir)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->saddr = pkt->saddr;
	key->daddr = pkt->daddr;
	key->sport = pkt->sport;
	key->dport = pkt->dport;
	key->proto = pkt->proto;
	key->family = pkt->family;
	key->dir = dir;
}

static __always_inline __u64 ct_lifetime(const struct pyebpflb_lb_config *config,
					 const struct pyebpflb_ct_entry *entry, __u8 proto)
{
	if (proto != IPPROTO_TCP)
		return config->ct_udp_ns;
	if (entry->flags & PYEBPFLB_CT_CLOSING)
		return config->ct_tcp_closing_ns;
	/* A DSR flow's answers go around the balancing node: never "seen". */
	if (!(entry->flags & (PYEBPFLB_CT_SEEN_REPLY | PYEBPFLB_CT_DSR)))
		return config->ct_tcp_syn_ns;
	return config->ct_tcp_established_ns;
}

/*
 * Note a packet of the flow: refresh it, and remember a FIN or RST. As in
 * Cilium and nf_conntrack, only a RST or a FIN from each side closes a flow
 * (the short timeout): a half-closed connection may still carry data the
 * other way for as long as it likes.
 */
static __always_inline void ct_touch(struct pyebpflb_ct_entry *entry, const struct packet *pkt,
				     __u64 now, int from_backend)
{
	__u8 flags = entry->flags;

	if (pkt->dry)
		return;
	if (from_backend)
		flags |= PYEBPFLB_CT_SEEN_REPLY;
	if (pkt->proto == IPPROTO_TCP) {
		if (pkt->tcp_flags & TCP_FLAG_RST)
			flags |= PYEBPFLB_CT_CLOSING;
		if (pkt->tcp_flags & TCP_FLAG_FIN)
			flags |= from_backend ? PYEBPFLB_CT_FIN_BACKEND : PYEBPFLB_CT_FIN_CLIENT;
		if ((flags & (PYEBPFLB_CT_FIN_CLIENT | PYEBPFLB_CT_FIN_BACKEND)) ==
		    (PYEBPFLB_CT_FIN_CLIENT | PYEBPFLB_CT_FIN_BACKEND))
			flags |= PYEBPFLB_CT_CLOSING;
	}
	if (flags != entry->flags)
		entry->flags = flags;
	entry->last_seen_ns = now;
}

static __always_inline int ct_expired(const struct pyebpflb_ct_entry *entry, __u8 proto,
				      const struct pyebpflb_lb_config *config, __u64 now)
{
	return now - entry->last_seen_ns > ct_lifetime(config, entry, proto);
}

/* The REPLY key of the flow whose SERVICE entry is `entry` under `key`. A
 * hairpin flow's backend answers the hairpin address, not the client. */
static __always_inline void ct_reply_key_of(struct pyebpflb_ct_key *reply,
					    const struct pyebpflb_ct_key *key,
					    const struct pyebpflb_ct_entry *entry,
					    const struct pyebpflb_lb_config *cfg)
{
	__builtin_memset(reply, 0, sizeof(*reply));
	reply->saddr = entry->nat_addr;
	reply->daddr =
	    entry->flags & PYEBPFLB_CT_HAIRPIN ? *hairpin_addr(cfg, key->family) : key->saddr;
	reply->sport = entry->nat_port;
	reply->dport = key->sport;
	reply->proto = key->proto;
	reply->family = key->family;
	reply->dir = PYEBPFLB_CT_REPLY;
}

/* The SERVICE key a REPLY entry under `reply_key` points back to (a hairpin
 * flow's client is its backend). */
static __always_inline void ct_service_key_of(struct pyebpflb_ct_key *key,
					      const struct pyebpflb_ct_key *reply_key,
					      const struct pyebpflb_ct_entry *reply)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->saddr = reply->flags & PYEBPFLB_CT_HAIRPIN ? reply_key->saddr : reply_key->daddr;
	key->daddr = reply->nat_addr;
	key->sport = reply_key->dport;
	key->dport = reply->nat_port;
	key->proto = reply_key->proto;
	key->family = reply_key->family;
	key->dir = PYEBPFLB_CT_SERVICE;
}

/* Does the SERVICE entry `flow` send its flow to the backend of `reply_key`,
 * under the service of `reply`? Then the two are halves of one flow. */
static __always_inline int ct_halves(const struct pyebpflb_ct_entry *flow,
				     const struct pyebpflb_ct_key *reply_key,
				     const struct pyebpflb_ct_entry *reply)
{
	return flow->service_id == reply->service_id && flow->nat_port == reply_key->sport &&
	       addr_equal(&flow->nat_addr, &reply_key->saddr);
}

/* Does the REPLY entry `reply` (under `reply_key`, built from `key`'s flow)
 * point back to the SERVICE key `key`, i.e. to its client's VIP:port? The
 * client's side of the two keys matches by construction. */
static __always_inline int ct_points_back(const struct pyebpflb_ct_entry *reply,
					  const struct pyebpflb_ct_key *key)
{
	return reply->nat_port == key->dport && addr_equal(&reply->nat_addr, &key->daddr);
}

/* Delete a flow: its SERVICE entry, and its REPLY entry when that is still its
 * own (another flow may have taken the key over). */
static __always_inline void ct_delete_flow(void *map, const struct pyebpflb_ct_key *key,
					   const struct pyebpflb_ct_entry *entry,
					   const struct packet *pkt,
					   const struct pyebpflb_lb_config *config)
{
	struct pyebpflb_ct_key reply_key;
	struct pyebpflb_ct_entry *reply;

	if (pkt->dry)
		return;
	ct_reply_key_of(&reply_key, key, entry, config);
	reply = bpf_map_lookup_elem(map, &reply_key);
	if (reply && reply->service_id == entry->service_id && ct_points_back(reply, key))
		bpf_map_delete_elem(map, &reply_key);
	bpf_map_delete_elem(map, key);
}

/* The SERVICE entry of a packet arriving for a VIP, or NULL when there is none
 * or it expired (then the flow is deleted, and starts over). */
static __always_inline struct pyebpflb_ct_entry *
ct_lookup_service(const struct pyebpflb_ct_key *key, const struct packet *pkt,
		  const struct pyebpflb_lb_config *config, __u64 now, struct ct_place *place)
{
	struct pyebpflb_ct_entry *entry = ct_find(key, place);

	if (!entry)
		return NULL;
	if (ct_expired(entry, pkt->proto, config, now)) {
		ct_delete_flow(place->map, key, entry, pkt, config);
		return NULL;
	}
	return entry;
}

/* A TCP SYN without ACK: the first packet of a new connection. */
static __always_inline int tcp_opens(const struct packet *pkt)
{
	return pkt->proto == IPPROTO_TCP &&
	       (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* A SYN on the tuple of a connection that saw a FIN or RST: a new connection
 * reusing the client's port. */
static __always_inline int ct_reopens(const struct pyebpflb_ct_entry *entry,
				      const struct packet *pkt)
{
	__u8 ended = PYEBPFLB_CT_CLOSING | PYEBPFLB_CT_FIN_CLIENT | PYEBPFLB_CT_FIN_BACKEND;

	return (entry->flags & ended) && tcp_opens(pkt);
}

#define CT_TUPLE_IN_USE 1
#define CT_FULL		2

/*
 * May a new flow take the REPLY key `reply_key`, held now by `held` of another
 * flow? Yes when that flow is gone, expired or closing (it is deleted), or
 * `even_live` (UDP: the tuple is its latest use's); no when it is live.
 */
static __always_inline int ct_take_over(void *map, const struct pyebpflb_ct_key *reply_key,
					const struct pyebpflb_ct_entry *held,
					const struct packet *pkt,
					const struct pyebpflb_lb_config *config, __u64 now,
					int even_live)
{
	struct pyebpflb_ct_entry *owner;
	struct pyebpflb_ct_key key;

	ct_service_key_of(&key, reply_key, held);
	owner = bpf_map_lookup_elem(map, &key);
	if (!owner || !ct_halves(owner, reply_key, held))
		return 0; /* the flow it was part of is gone */
	if (!even_live && !(owner->flags & PYEBPFLB_CT_CLOSING) &&
	    !ct_expired(owner, pkt->proto, config, now))
		return CT_TUPLE_IN_USE;
	if (!pkt->dry)
		bpf_map_delete_elem(map, &key);
	return 0;
}

/* Record a new flow (`nat`: its PYEBPFLB_CT_SNAT): both entries, or neither. 0, CT_TUPLE_IN_USE (a
 * live flow holds the backend's side: choose another backend) or CT_FULL. */
static __always_inline int ct_create(const struct pyebpflb_ct_key *service_key,
				     const struct packet *pkt,
				     const struct pyebpflb_backend *backend, __u32 backend_id,
				     __u32 service_id, __u8 nat,
				     const struct pyebpflb_lb_config *config, __u64 now)
{
	struct pyebpflb_ct_entry entry = {
	    .nat_addr = backend->addr,
	    .nat_port = backend->port,
	    .flags = nat | (addr_equal(&backend->addr, &pkt->saddr) ? PYEBPFLB_CT_HAIRPIN : 0),
	    .backend_id = backend_id,
	    .service_id = service_id,
	    .created_ns = now,
	    .last_seen_ns = now,
	};
	struct pyebpflb_ct_key reply_key;
	struct pyebpflb_ct_entry reply = entry, *held;
	void *map = pkt->proto == IPPROTO_TCP ? (void *)&lb_ct_syn : (void *)&lb_ct_udp;
	struct pyebpflb_ct_stats *stats;
	struct ct_place place;

	ct_reply_key_of(&reply_key, service_key, &entry, config);
	held = ct_find(&reply_key, &place);
	if (held && !ct_points_back(held, service_key) &&
	    ct_take_over(place.map, &reply_key, held, pkt, config, now, 0))
		return CT_TUPLE_IN_USE;
	if (pkt->dry)
		return 0;
	/* Taken over, or held by this very flow (its SERVICE half was lost): the
	 * entry goes from its map, and the new one is made where new flows start. */
	if (held)
		bpf_map_delete_elem(place.map, &reply_key);
	reply.nat_addr = pkt->daddr;
	reply.nat_port = pkt->dport;
	if (bpf_map_update_elem(map, &reply_key, &reply, BPF_ANY))
		return CT_FULL;
	if (bpf_map_update_elem(map, service_key, &entry, BPF_ANY)) {
		bpf_map_delete_elem(map, &reply_key);
		return CT_FULL;
	}
	stats = ct_stats(pkt->proto, 1);
	if (stats)
		stats->created++;
	return 0;
}

/*
 * The live flow a backend's answer belongs to: its REPLY entry (under `key`)
 * and the SERVICE entry that points back to it, alive and sending the flow
 * to this backend. A REPLY entry without such a flow is stale: it is deleted
 * and NULL returned, and the packet is unrelated traffic.
 */
static __always_inline struct pyebpflb_ct_entry *
ct_lookup_reply(const struct pyebpflb_ct_key *key, const struct packet *pkt,
		const struct pyebpflb_lb_config *config, __u64 now, struct pyebpflb_ct_entry **flow,
		struct ct_place *place)
{
	struct pyebpflb_ct_entry *reply = ct_find(key, place);
	struct pyebpflb_ct_key service_key;

	if (!reply)
		return NULL;
	ct_service_key_of(&service_key, key, reply);
	*flow = bpf_map_lookup_elem(place->map, &service_key);
	if (*flow && !ct_halves(*flow, key, reply))
		*flow = NULL; /* that key holds another flow now */
	if (*flow && !ct_expired(*flow, key->proto, config, now))
		return reply;
	if (!pkt->dry) {
		if (*flow) {
			bpf_map_delete_elem(place->map, &service_key); /* expired */
		} else {
			struct pyebpflb_ct_stats *stats = ct_stats(key->proto, place->unconfirmed);

			if (stats)
				stats->orphaned++; /* its flow half was evicted, or taken over */
		}
		bpf_map_delete_elem(place->map, key);
	}
	*flow = NULL;
	return NULL;
}

/*
 * Restore a flow's REPLY half if it is missing (the LRU evicted it alone), so
 * the backend's answers are translated again. Checked when the flow's clock
 * passes into a new second (2^30 ns), not on every packet: a lost half heals
 * within about a second of the client's next packet.
 */
static __always_inline void ct_heal_reply(void *map, const struct pyebpflb_ct_key *key,
					  const struct pyebpflb_ct_entry *entry,
					  const struct packet *pkt,
					  const struct pyebpflb_lb_config *config, __u64 now)
{
	struct pyebpflb_ct_entry reply = *entry;
	struct pyebpflb_ct_key reply_key;

	if (pkt->dry || !((now ^ entry->last_seen_ns) >> 30))
		return;
	ct_reply_key_of(&reply_key, key, entry, config);
	if (bpf_map_lookup_elem(map, &reply_key))
		return;
	reply.nat_addr = key->daddr;
	reply.nat_port = key->dport;
	if (!bpf_map_update_elem(map, &reply_key, &reply, BPF_NOEXIST)) {
		struct pyebpflb_ct_stats *stats = ct_stats(key->proto, 0);

		if (stats)
			stats->healed++;
	}
}

/*
 * A packet not for a VIP whose answers would carry the REPLY key of a
 * translated flow: the client talks straight to a backend from the port of an
 * earlier VIP flow. A TCP SYN (a new connection) replaces that flow when it is
 * closing or gone, so the backend's SYN-ACK is not rewritten to the VIP; a
 * live TCP flow keeps its key (two connections on one tuple cannot both
 * work). A UDP datagram always takes the tuple over: UDP has no connection,
 * the tuple belongs to its latest use (a DNS client that asks a VIP, then the
 * backend itself, from one socket gets each answer from the address it
 * asked). Answers to both, interleaved, would need the source port of one
 * remapped, as nf_nat does; see docs/decisions.md 30.
 */
static __always_inline void ct_direct(const struct packet *pkt,
				      const struct pyebpflb_lb_config *config, __u64 now)
{
	struct pyebpflb_ct_key reply_key = {
	    .saddr = pkt->daddr,
	    .daddr = pkt->saddr,
	    .sport = pkt->dport,
	    .dport = pkt->sport,
	    .proto = pkt->proto,
	    .family = pkt->family,
	    .dir = PYEBPFLB_CT_REPLY,
	};
	struct pyebpflb_ct_entry *held;
	struct ct_place place;

	if (pkt->proto == IPPROTO_TCP ? !tcp_opens(pkt) : pkt->proto != IPPROTO_UDP)
		return;
	held = ct_find(&reply_key, &place);
	if (!held ||
	    ct_take_over(place.map, &reply_key, held, pkt, config, now, pkt->proto == IPPROTO_UDP))
		return;
	if (!pkt->dry)
		bpf_map_delete_elem(place.map, &reply_key);
}

/*
 * The backend answered a TCP flow still in lb_ct_syn: both entries move to
 * lb_ct, where SYN floods do not reach them. The reply half under `key` is
 * `reply`, the flow `flow` (the caller has just touched it). If lb_ct is
 * full its LRU makes room; should the move fail, the flow stays where it is.
 */
static __always_inline void ct_confirm(const struct pyebpflb_ct_key *key,
				       const struct pyebpflb_ct_entry *reply,
				       const struct pyebpflb_ct_entry *flow,
				       const struct packet *pkt)
{
	struct pyebpflb_ct_stats *stats;
	struct pyebpflb_ct_entry copy;
	struct pyebpflb_ct_key service_key;

	if (pkt->dry)
		return;
	ct_service_key_of(&service_key, key, reply);
	copy = *flow;
	if (bpf_map_update_elem(&lb_ct, &service_key, &copy, BPF_ANY))
		return;
	copy = *reply;
	if (bpf_map_update_elem(&lb_ct, key, &copy, BPF_ANY)) {
		bpf_map_delete_elem(&lb_ct, &service_key);
		return;
	}
	bpf_map_delete_elem(&lb_ct_syn, key);
	bpf_map_delete_elem(&lb_ct_syn, &service_key);
	stats = ct_stats(IPPROTO_TCP, 1);
	if (stats)
		stats->confirmed++;
}

#endif
