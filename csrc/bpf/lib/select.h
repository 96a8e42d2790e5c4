/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Choosing a backend for a new flow: by weight through the service's slots
 * (the alias method, pyebpflb.alias), by Maglev, or the client's last one
 * under session affinity (lib/affinity.h).
 */
#ifndef PYEBPFLB_BPF_SELECT_H
#define PYEBPFLB_BPF_SELECT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/affinity.h"
#include "lib/hash.h"
#include "lib/parse.h"
#include "lib/service.h"

/*
 * A backend of the service's current generation, drawn by weight: a slot,
 * then the alias draw, both from a hash of the flow (not a random number), so
 * that a flow whose conntrack entries were lost (evicted, or the LRU took one
 * half) lands on the same backend again while the set is unchanged; over many
 * flows the hash is as even as a random draw. `salt` gives a second, other
 * choice. The generation's slots were complete before the service entry
 * pointing at them was written, so every slot up to `count` exists.
 */
static __always_inline __u32 slot_backend(const struct pyebpflb_service *svc,
					  const struct packet *pkt, __u32 salt,
					  struct pyebpflb_backend **backend)
{
	struct pyebpflb_slot_key key = {.service_id = svc->id};
	__u32 hash = hash_final(hash_word(flow_hash(pkt, 0), salt));
	struct pyebpflb_slot *slot;
	__u32 backend_id, draw;

	key.slot = ((__u32)svc->gen << PYEBPFLB_SLOT_GEN_SHIFT) | (hash % svc->count + 1);
	slot = bpf_map_lookup_elem(&lb_slots, &key);
	if (!slot)
		return 0;
	draw = hash_final(hash_word(hash, 0x2545f491));
	backend_id = draw < slot->threshold ? slot->backend_id : slot->alias_id;
	*backend = backend_lookup(backend_id);
	return *backend ? backend_id : 0;
}

/* Maglev: the table slot the flow's hash falls in. Several load balancers with
 * the same backends send a flow to the same backend. Under affinity Maglev
 * hashes the client's address alone: that is the affinity, with no state. */
static __always_inline __u32 maglev_backend(const struct pyebpflb_service *svc,
					    const struct packet *pkt,
					    const struct pyebpflb_lb_config *cfg,
					    struct pyebpflb_backend **backend)
{
	__u32 key = svc->id | (__u32)svc->gen << PYEBPFLB_MAGLEV_GEN_SHIFT;
	void *table = bpf_map_lookup_elem(&lb_maglev, &key);
	__u32 slot, *backend_id;

	if (!table || !cfg->maglev_table_size)
		return 0;
	slot = flow_hash(pkt, svc->affinity_timeout_s != 0) % cfg->maglev_table_size;
	backend_id = bpf_map_lookup_elem(table, &slot);
	if (!backend_id || !*backend_id)
		return 0;
	*backend = backend_lookup(*backend_id);
	return *backend ? *backend_id : 0;
}

/* The backend for a new flow to `svc`, or 0 when the service has none. */
static __always_inline __u32 select_backend(const struct pyebpflb_service *svc,
					    const struct packet *pkt,
					    const struct pyebpflb_lb_config *cfg, __u64 now,
					    struct pyebpflb_backend **backend)
{
	__u32 backend_id = 0;

	if (!svc->count)
		return 0;
	if (svc->flags & PYEBPFLB_SERVICE_MAGLEV)
		return maglev_backend(svc, pkt, cfg, backend);
	if (svc->affinity_timeout_s)
		backend_id = affinity_backend(svc, pkt, now, backend);
	if (!backend_id)
		backend_id = slot_backend(svc, pkt, 0, backend);
	return backend_id;
}

#endif
