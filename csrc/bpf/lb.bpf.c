// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Service load balancer on tc: the ingress of the attached interface
 * translates packets for a service to a backend, its egress translates the
 * backends' replies back (lib/balance.h has the steps).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/balance.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tc")
int lb_ingress(struct __sk_buff *skb)
{
	return lb_ingress_steps(skb);
}

SEC("tc")
int lb_egress(struct __sk_buff *skb)
{
	return lb_egress_steps(skb);
}
