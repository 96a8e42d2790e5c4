/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Connection tracking for translated flows. A flow has two entries: SERVICE,
 * keyed by the client's packet as it arrives (client -> VIP), and REPLY,
 * keyed by the backend's answer (backend -> client). The SERVICE entry holds
 * the flow's life: both directions refresh it, and only it expires. A REPLY
 * entry lives until its flow is replaced or the LRU evicts it.
 */
#ifndef PYEBPFLB_BPF_CT_H
#define PYEBPFLB_BPF_CT_H

#include <linux/bpf.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/parse.h"

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* Both entries of every translated flow. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct pyebpflb_ct_key);
	__type(value, struct pyebpflb_ct_entry);
} lb_ct SEC(".maps");

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
	if (!(entry->flags & PYEBPFLB_CT_SEEN_REPLY))
		return config->ct_tcp_syn_ns;
	return config->ct_tcp_established_ns;
}

/* Note a packet of the flow: refresh it, and remember a FIN or RST. */
static __always_inline void ct_touch(struct pyebpflb_ct_entry *entry, const struct packet *pkt,
				     __u64 now, __u8 extra_flags)
{
	__u8 flags = entry->flags | extra_flags;

	if (pkt->dry)
		return;
	if (pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		flags |= PYEBPFLB_CT_CLOSING;
	if (flags != entry->flags)
		entry->flags = flags;
	entry->last_seen_ns = now;
}

/* The SERVICE entry of a packet arriving for a VIP, or NULL when there is none
 * or it expired (then it is deleted, and the flow starts over). */
static __always_inline struct pyebpflb_ct_entry *
ct_lookup_service(const struct pyebpflb_ct_key *key, const struct packet *pkt,
		  const struct pyebpflb_lb_config *config, __u64 now)
{
	struct pyebpflb_ct_entry *entry = bpf_map_lookup_elem(&lb_ct, key);

	if (!entry)
		return NULL;
	if (now - entry->last_seen_ns > ct_lifetime(config, entry, pkt->proto)) {
		if (!pkt->dry)
			bpf_map_delete_elem(&lb_ct, key);
		return NULL;
	}
	return entry;
}

/* A SYN without ACK on the tuple of a connection that saw FIN or RST: a new
 * connection reusing the client's port. */
static __always_inline int ct_reopens(const struct pyebpflb_ct_entry *entry,
				      const struct packet *pkt)
{
	return pkt->proto == IPPROTO_TCP && (entry->flags & PYEBPFLB_CT_CLOSING) &&
	       (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* Record a new flow: both entries, or neither. */
static __always_inline int ct_create(const struct pyebpflb_ct_key *service_key,
				     const struct packet *pkt,
				     const struct pyebpflb_backend *backend, __u32 backend_id,
				     __u32 service_id, __u64 now)
{
	struct pyebpflb_ct_entry entry = {
	    .nat_addr = backend->addr,
	    .nat_port = backend->port,
	    .backend_id = backend_id,
	    .service_id = service_id,
	    .created_ns = now,
	    .last_seen_ns = now,
	};
	struct pyebpflb_ct_key reply_key = {
	    .saddr = backend->addr,
	    .daddr = pkt->saddr,
	    .sport = backend->port,
	    .dport = pkt->sport,
	    .proto = pkt->proto,
	    .family = pkt->family,
	    .dir = PYEBPFLB_CT_REPLY,
	};
	struct pyebpflb_ct_entry reply = entry;

	if (pkt->dry)
		return 0;
	reply.nat_addr = pkt->daddr;
	reply.nat_port = pkt->dport;
	if (bpf_map_update_elem(&lb_ct, &reply_key, &reply, BPF_ANY))
		return -1;
	if (bpf_map_update_elem(&lb_ct, service_key, &entry, BPF_ANY)) {
		bpf_map_delete_elem(&lb_ct, &reply_key);
		return -1;
	}
	return 0;
}

/* The SERVICE entry that a REPLY entry belongs to, keyed from the reply packet. */
static __always_inline struct pyebpflb_ct_entry *
ct_lookup_service_of_reply(const struct packet *pkt, const struct pyebpflb_ct_entry *reply)
{
	struct pyebpflb_ct_key key = {
	    .saddr = pkt->daddr,
	    .daddr = reply->nat_addr,
	    .sport = pkt->dport,
	    .dport = reply->nat_port,
	    .proto = pkt->proto,
	    .family = pkt->family,
	    .dir = PYEBPFLB_CT_SERVICE,
	};

	return bpf_map_lookup_elem(&lb_ct, &key);
}

#endif
