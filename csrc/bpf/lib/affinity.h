/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Session affinity (Kubernetes' ClientIP): a new flow from a client goes to
 * the backend of the client's last new flow, while that backend still takes
 * new flows and the client came back within the timeout. Maglev services do
 * without this map: their affinity is a hash of the client's address.
 */
#ifndef PYEBPFLB_BPF_AFFINITY_H
#define PYEBPFLB_BPF_AFFINITY_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/parse.h"
#include "lib/service.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pyebpflb_affinity_key);
	__type(value, struct pyebpflb_affinity);
} lb_affinity SEC(".maps");

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
	*backend = backend_lookup(backend_id);
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

	if (!pkt->dry)
		bpf_map_update_elem(&lb_affinity, &key, &value, BPF_ANY);
}

#endif
