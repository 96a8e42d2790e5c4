/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Services: VIP:port -> the service entry, its generation's slots, the
 * backends, Maglev tables, names and counters. User space (plan.py) writes a
 * generation's slots and backends before the service entry that points at
 * them, so a packet that found the entry finds everything it names.
 */
#ifndef PYEBPFLB_BPF_SERVICE_H
#define PYEBPFLB_BPF_SERVICE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/counters.h"
#include "lib/node.h"
#include "lib/parse.h"

/* Services, slots and backends are replaced whole by user space while
 * packets read them. Without preallocation a replaced element is freed only
 * after an RCU grace period, so a reader never sees a value half-rewritten.
 * The services are kept twice: packets read the map lb_config's service_map
 * names, a change writes the other, flips service_map (every service of the
 * change at once), then brings the first one level. */
struct services_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pyebpflb_service_key);
	__type(value, struct pyebpflb_service);
};

struct services_map lb_services SEC(".maps");
struct services_map lb_services_alt SEC(".maps");

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

/*
 * Maglev tables: (service id | its entry's gen << 31) -> an array of backend
 * ids. User space builds a whole new table under the generation the service
 * entry does not point at yet, so packets never read a table being edited. BPF_F_INNER_MAP lets the
 * tables have the datapath's size rather than this template's.
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

/* Names of services, for reading the state back; never touched by packets. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pyebpflb_service_name);
} lb_svc_names SEC(".maps");

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

/* lb_be_gone (user space only): backends that left their service while flows
 * may still name them: id -> the backend as it was, so its counters stay
 * readable until the garbage collector finds its last flow gone. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pyebpflb_backend);
} lb_be_gone SEC(".maps");

static __always_inline struct pyebpflb_service *service_find(const struct pyebpflb_service_key *key,
							     const struct pyebpflb_lb_config *cfg)
{
	if (cfg->service_map & PYEBPFLB_SERVICE_MAP_ALT)
		return bpf_map_lookup_elem(&lb_services_alt, key);
	return bpf_map_lookup_elem(&lb_services, key);
}

/*
 * The service of the packet's destination: its own address and port, or, on
 * an address NodePorts are served on, the NodePort entry of that port (whose
 * key's address is 0, as Cilium's surrogate 0.0.0.0:port frontend). One
 * lookup for a ClusterIP; two more for a NodePort or a miss on a node address.
 */
static __always_inline struct pyebpflb_service *service_lookup(const struct packet *pkt,
							       const struct pyebpflb_lb_config *cfg)
{
	struct pyebpflb_service_key key = {
	    .vip = pkt->daddr, .port = pkt->dport, .proto = pkt->proto, .family = pkt->family};
	struct pyebpflb_vip_key address = {.vip = pkt->daddr, .family = pkt->family};
	struct pyebpflb_service *svc = service_find(&key, cfg);

	if (svc || !nodeport_address(&address))
		return svc;
	__builtin_memset(&key.vip, 0, sizeof(key.vip));
	svc = service_find(&key, cfg);
	return svc && svc->kind == PYEBPFLB_KIND_NODE_PORT ? svc : NULL;
}

static __always_inline struct pyebpflb_backend *backend_lookup(__u32 backend_id)
{
	return bpf_map_lookup_elem(&lb_backends, &backend_id);
}

#endif
