// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* The floor of per-packet cost: a tc program that does nothing (bench/). */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tc")
int empty(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}
