// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Interface packet/byte counter: the smallest program that proves the whole
 * path (build, ship, load, attach, count real traffic, read back, detach).
 * One program per hook, all counting into one per-CPU hash keyed by
 * (ifindex, hook).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/counter.h"
#include "lib/counters.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct pyebpflb_counter_key);
	__type(value, struct pyebpflb_counter_value);
} iface_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pyebpflb_counter_config);
} counter_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} counter_events SEC(".maps");

static __always_inline void emit_event(__u32 ifindex, __u32 hook, __u32 len)
{
	struct pyebpflb_counter_event *event;

	/* Reserve can fail when user space lags; the counter still counts. */
	event = bpf_ringbuf_reserve(&counter_events, sizeof(*event), 0);
	if (!event)
		return;
	event->timestamp_ns = bpf_ktime_get_ns();
	event->ifindex = ifindex;
	event->hook = hook;
	event->len = len;
	event->_pad = 0;
	bpf_ringbuf_submit(event, 0);
}

static __always_inline void count(__u32 ifindex, __u32 hook, __u32 len)
{
	struct pyebpflb_counter_key key = {.ifindex = ifindex, .hook = hook};
	struct pyebpflb_counter_config *config;
	__u32 zero = 0;

	count_or_create(&iface_counters, &key, len);
	config = bpf_map_lookup_elem(&counter_config, &zero);
	if (config && config->emit_events)
		emit_event(ifindex, hook, len);
}

/* TC_ACT_UNSPEC hands the packet on to the next filter: counting never decides. */
SEC("tc")
int count_tc_ingress(struct __sk_buff *skb)
{
	count(skb->ifindex, PYEBPFLB_HOOK_TC_INGRESS, skb->len);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int count_tc_egress(struct __sk_buff *skb)
{
	count(skb->ifindex, PYEBPFLB_HOOK_TC_EGRESS, skb->len);
	return TC_ACT_UNSPEC;
}

SEC("xdp")
int count_xdp(struct xdp_md *ctx)
{
	count(ctx->ingress_ifindex, PYEBPFLB_HOOK_XDP, (__u32)(ctx->data_end - ctx->data));
	return XDP_PASS;
}

/* cgroup_skb programs return 1 to let the packet through. */
SEC("cgroup_skb/ingress")
int count_cgroup_ingress(struct __sk_buff *skb)
{
	count(skb->ifindex, PYEBPFLB_HOOK_CGROUP_INGRESS, skb->len);
	return 1;
}

SEC("cgroup_skb/egress")
int count_cgroup_egress(struct __sk_buff *skb)
{
	count(skb->ifindex, PYEBPFLB_HOOK_CGROUP_EGRESS, skb->len);
	return 1;
}
