/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Per-CPU packet and byte counters. */
#ifndef PYEBPFLB_BPF_COUNTERS_H
#define PYEBPFLB_BPF_COUNTERS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/counter.h"

/* Count a packet of `len` bytes under `key`, creating the counter if needed.
 * The value is this CPU's own, so no atomics are needed. */
static __always_inline void count_or_create(void *map, const void *key, __u32 len)
{
	struct pyebpflb_counter_value *value = bpf_map_lookup_elem(map, key);

	if (value) {
		value->packets += 1;
		value->bytes += len;
	} else {
		struct pyebpflb_counter_value first = {.packets = 1, .bytes = len};

		/* BPF_NOEXIST fails when a CPU that raced us created it first: then
		 * this CPU's slot of the new entry exists, and the packet goes there
		 * (a per-CPU hash allocates every CPU's value with the element). */
		if (bpf_map_update_elem(map, key, &first, BPF_NOEXIST)) {
			value = bpf_map_lookup_elem(map, key);
			if (value) {
				value->packets += 1;
				value->bytes += len;
			}
		}
	}
}

static __always_inline void count_traffic(void *map, __u32 id, __u32 len)
{
	struct pyebpflb_counter_value *value = bpf_map_lookup_elem(map, &id);

	if (value) {
		value->packets += 1;
		value->bytes += len;
	}
}

/* Replies (backend -> client) are counted beside the forward direction, in
 * the same map under the id with the top bit set. */
#define COUNTER_REPLY (1u << 31)

static __always_inline void count_reply(void *map, __u32 id, __u32 len)
{
	__u32 key = id | COUNTER_REPLY;

	count_or_create(map, &key, len);
}

/* Count the first packet of a new flow, creating the counter if needed. */
static __always_inline void count_new_flow(void *map, __u32 id, __u32 len)
{
	count_or_create(map, &id, len);
}

#endif
