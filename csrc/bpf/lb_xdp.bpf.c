// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * The load balancer's ingress on XDP: the same steps as lb.bpf.c's tc
 * ingress (lib/balance.h), compiled over struct xdp_md. Its maps are the tc
 * datapath's, reused at load (a user-space loader passes them in), so XDP
 * and tc share services, conntrack and counters: replies still take the tc
 * egress, where XDP has no hook. Explain stays with the tc program.
 */
#define PYEBPFLB_CTX_XDP

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/balance.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("xdp")
int lb_xdp_ingress(struct xdp_md *ctx)
{
	return lb_ingress_steps(ctx);
}
