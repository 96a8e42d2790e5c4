// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Reads the packet without a bounds check: the verifier must reject it. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tc")
int unchecked_access(struct __sk_buff *skb)
{
	__u8 *data = (__u8 *)(long)skb->data;

	return data[20];
}
