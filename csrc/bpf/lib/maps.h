/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Every map of the load balancer. Sizes here are placeholders: the Python
 * Datapath sets max_entries from its constructor before load.
 */
#ifndef PYEBPFLB_BPF_MAPS_H
#define PYEBPFLB_BPF_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/counters.h"

/* Services, slots and backends are replaced whole by user space while
 * packets read them. Without preallocation a replaced element is freed only
 * after an RCU grace period, so a reader never sees a value half-rewritten. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pyebpflb_service_key);
	__type(value, struct pyebpflb_service);
} lb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 524288);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pyebpflb_slot_key);
	__type(value, struct pyebpflb_slot);
} lb_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pyebpflb_backend);
} lb_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct pyebpflb_ct_key);
	__type(value, struct pyebpflb_ct_entry);
} lb_ct SEC(".maps");

/*
 * Maglev tables: service id -> an array of backend ids. User space builds a
 * whole new table and swaps it in with one update of the outer map, so
 * packets never read a table being edited. BPF_F_INNER_MAP lets the tables
 * have the datapath's size rather than this template's.
 */
struct maglev_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 251);
	__uint(map_flags, BPF_F_INNER_MAP);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__array(values, struct maglev_table);
} lb_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pyebpflb_affinity_key);
	__type(value, struct pyebpflb_affinity);
} lb_affinity SEC(".maps");

/* Per-CPU counters, summed over CPUs on read. An entry is created by the first
 * new flow of its service or backend (so programming a service writes no
 * counter) and deleted by user space with the service or backend. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pyebpflb_counter_value);
} lb_svc_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pyebpflb_counter_value);
} lb_be_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PYEBPFLB_DROP_MAX);
	__type(key, __u32);
	__type(value, struct pyebpflb_counter_value);
} lb_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pyebpflb_lb_config);
} lb_config SEC(".maps");

/* Names of services, for reading the state back; never touched by packets. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pyebpflb_service_name);
} lb_svc_names SEC(".maps");

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

/* Per-rule counters, created by a rule's first match. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pyebpflb_counter_value);
} lb_rule_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct pyebpflb_frag_key);
	__type(value, struct pyebpflb_frag_ports);
} lb_frags SEC(".maps");

static __always_inline void count_traffic(void *map, __u32 id, __u32 len)
{
	struct pyebpflb_counter_value *value = bpf_map_lookup_elem(map, &id);

	if (value) {
		value->packets += 1;
		value->bytes += len;
	}
}

/* Count the first packet of a new flow, creating the counter if needed. */
static __always_inline void count_new_flow(void *map, __u32 id, __u32 len)
{
	count_or_create(map, &id, len);
}

static __always_inline void count_drop(__u32 reason, __u32 len)
{
	count_traffic(&lb_drops, reason, len);
}

#endif
