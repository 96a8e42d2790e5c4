/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The datapath's settings (timeouts, event mask and rate, policy switch),
 * written by user space, one entry. Sizes of every map in lib/ are
 * placeholders: the Python Datapath sets max_entries before load. */
#ifndef PYEBPFLB_BPF_CONFIG_H
#define PYEBPFLB_BPF_CONFIG_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pyebpflb_lb_config);
} lb_config SEC(".maps");

static __always_inline struct pyebpflb_lb_config *config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&lb_config, &zero);
}

/* The hairpin address of a family (PYEBPFLB_IPV4 or PYEBPFLB_IPV6). */
static __always_inline const union pyebpflb_addr *hairpin_addr(const struct pyebpflb_lb_config *cfg,
							       __u8 family)
{
	return family == PYEBPFLB_IPV4 ? &cfg->hairpin_v4 : &cfg->hairpin_v6;
}

#endif
