/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Layouts of the interface counter program (counter.bpf.c): the one
 * definition read by the BPF C and by the Python binding.
 */
#ifndef PYEBPFLB_COUNTER_H
#define PYEBPFLB_COUNTER_H

#include "pyebpflb/types.h"

/* Where a counter program runs; part of the counter key. */
enum pyebpflb_hook {
	PYEBPFLB_HOOK_TC_INGRESS = 1,
	PYEBPFLB_HOOK_TC_EGRESS = 2,
	PYEBPFLB_HOOK_XDP = 3,
	PYEBPFLB_HOOK_CGROUP_INGRESS = 4,
	PYEBPFLB_HOOK_CGROUP_EGRESS = 5,
};

struct pyebpflb_counter_key {
	__u32 ifindex;
	__u32 hook; /* enum pyebpflb_hook */
};

/* Per-CPU value of the iface_counters map; user space sums the CPUs. */
struct pyebpflb_counter_value {
	__u64 packets;
	__u64 bytes;
};

/* Single entry of the counter_config array. */
struct pyebpflb_counter_config {
	__u32 emit_events; /* non-zero: one ring buffer event per packet */
	__u32 _pad;
};

/* Ring buffer record emitted for each packet when events are enabled. */
struct pyebpflb_counter_event {
	__u64 timestamp_ns;
	__u32 ifindex;
	__u32 hook; /* enum pyebpflb_hook */
	__u32 len;
	__u32 _pad;
};

#endif
