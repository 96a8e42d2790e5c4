/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The node a datapath serves (its network namespace, addresses, name), the
 * nodes its backends run on, and the addresses its services have: what the
 * socket programs scope by, what internalTrafficPolicy Local is planned
 * from (user space), what refuses a service address's unallocated ports, and
 * the addresses NodePorts are served on.
 */
#ifndef PYEBPFLB_BPF_NODE_H
#define PYEBPFLB_BPF_NODE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pyebpflb_node);
} lb_node SEC(".maps");

/* User space only: read back as Backend(node=...). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pyebpflb_node_name);
} lb_be_nodes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pyebpflb_vip_key);
	__type(value, __u32);
} lb_vips SEC(".maps");

/* The addresses NodePorts are served on: the node's own, or those it was told
 * (kube-proxy's --nodeport-addresses). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pyebpflb_vip_key);
	__type(value, __u32);
} lb_nodeport SEC(".maps");

static __always_inline struct pyebpflb_node *node(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&lb_node, &zero);
}

/* The packet's destination is some service's address (on another port). */
static __always_inline int vip_known(const struct packet *pkt)
{
	struct pyebpflb_vip_key key = {.vip = pkt->daddr, .family = pkt->family};

	return bpf_map_lookup_elem(&lb_vips, &key) != NULL;
}

/* The packet's destination is an address this node serves its NodePorts on. */
static __always_inline int nodeport_address(const struct pyebpflb_vip_key *key)
{
	return bpf_map_lookup_elem(&lb_nodeport, key) != NULL;
}

#endif
