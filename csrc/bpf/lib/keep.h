/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The maps only user space reads (names, rules, backends that left) are
 * referenced by the programs too, so that they live exactly as long as a
 * program of the datapath is attached. Pins alone do not keep them: under
 * `ip netns exec` the bpffs that holds a datapath's pins belongs to a mount
 * namespace that ends with the command, and a map no program uses would be
 * freed with it, though lb_config still lists its id.
 *
 * The lookups sit behind a test of a value the datapath never has (the
 * verifier, which cannot know it, checks them; the CPU never runs them):
 * one compare a packet.
 */
#ifndef PYEBPFLB_BPF_KEEP_H
#define PYEBPFLB_BPF_KEEP_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/node.h"
#include "lib/nodeport.h"
#include "lib/policy.h"
#include "lib/service.h"
#include "lib/sock.h"

#define KEEP_MAPS_NEVER 0xffffffffu /* no layout is numbered so */

static __always_inline void keep_maps(const struct pyebpflb_lb_config *cfg)
{
	struct pyebpflb_sock_key sock_key = {};
	struct pyebpflb_policy_member_key member_key = {};
	__u32 key = 0;

	if (cfg->layout_version != KEEP_MAPS_NEVER)
		return;
	bpf_map_lookup_elem(&lb_svc_names, &key);
	bpf_map_lookup_elem(&lb_be_gone, &key);
	bpf_map_lookup_elem(&lb_pol_names, &key);
	bpf_map_lookup_elem(&lb_pol_rules, &key);
	bpf_map_lookup_elem(&lb_be_nodes, &key);
	bpf_map_lookup_elem(&lb_node, &key);
	bpf_map_lookup_elem(&lb_frontends, &key);
	bpf_map_lookup_elem(&lb_sock_revnat, &sock_key);
	bpf_map_lookup_elem(&lb_pol_members, &member_key);
}

#endif
