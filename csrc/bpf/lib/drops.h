/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Packets the load balancer dropped or refused, counted per reason; the
 * flow event that tells user space is lib/events.h's note_drop. */
#ifndef PYEBPFLB_BPF_DROPS_H
#define PYEBPFLB_BPF_DROPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/counters.h"

/* Dropped and refused packets, by reason (enum pyebpflb_drop_reason). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PYEBPFLB_DROP_MAX);
	__type(key, __u32);
	__type(value, struct pyebpflb_counter_value);
} lb_drops SEC(".maps");

static __always_inline void count_drop(__u32 reason, __u32 len)
{
	count_traffic(&lb_drops, reason, len);
}

#endif
