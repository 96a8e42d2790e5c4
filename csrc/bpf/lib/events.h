/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Flow events to user space through one BPF ring buffer, under a per-CPU
 * rate limit. Every event held back (by the limit, or a full ring) is
 * counted in lb_event_stats: loss is a number, never silent.
 */
#ifndef PYEBPFLB_BPF_EVENTS_H
#define PYEBPFLB_BPF_EVENTS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "pyebpflb/lb.h"
#include "lib/config.h"
#include "lib/counters.h"
#include "lib/drops.h"
#include "lib/ctx.h"
#include "lib/parse.h"
#include "lib/service.h"

#define EVENT_WINDOW_NS 1000000000ULL

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} lb_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pyebpflb_event_stats);
} lb_event_stats SEC(".maps");

/*
 * When a reader last said it is there (bpf_ktime_get_ns). Events are made
 * only while one reads: an unwatched datapath neither fills the ring nor
 * counts its events as lost. A reader renews this every second.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lb_event_reader SEC(".maps");

#define EVENT_READER_TIMEOUT_NS (5 * 1000000000ULL)

/*
 * A new event of `type` about `pkt`, its common fields filled, or NULL when
 * that type is off, over the rate, or the ring is full. The caller fills in
 * the rest and submits it with bpf_ringbuf_submit.
 */
static __always_inline struct pyebpflb_flow_event *
event_start(struct ctx_buff *ctx, const struct packet *pkt, __u8 type, __u8 dir)
{
	struct pyebpflb_lb_config *cfg;
	struct pyebpflb_event_stats *stats;
	struct pyebpflb_flow_event *event;
	__u32 zero = 0;
	__u64 now, *reader;

	if (pkt->dry)
		return NULL;
	cfg = config();
	if (!cfg || !(cfg->event_mask & (1U << type)))
		return NULL;
	now = bpf_ktime_get_ns();
	reader = bpf_map_lookup_elem(&lb_event_reader, &zero);
	if (!reader || now - *reader > EVENT_READER_TIMEOUT_NS)
		return NULL;
	stats = bpf_map_lookup_elem(&lb_event_stats, &zero);
	if (!stats)
		return NULL;
	if (now - stats->window_ns >= EVENT_WINDOW_NS) {
		stats->window_ns = now;
		stats->in_window = 0;
	}
	if (stats->in_window >= cfg->event_rate) {
		stats->rate_limited += 1;
		return NULL;
	}
	stats->in_window += 1;
	event = bpf_ringbuf_reserve(&lb_events, sizeof(*event), 0);
	if (!event) {
		stats->lost += 1;
		return NULL;
	}
	stats->sent += 1;
	__builtin_memset(event, 0, sizeof(*event));
	event->time_ns = now;
	event->saddr = pkt->saddr;
	event->daddr = pkt->daddr;
	event->sport = pkt->sport;
	event->dport = pkt->dport;
	event->family = pkt->family;
	event->proto = pkt->proto;
	event->type = type;
	event->dir = dir;
	event->ifindex = ctx_ifindex(ctx);
	event->len = ctx_len(ctx);
	return event;
}

static __always_inline void explain(struct ctx_buff *ctx, const struct packet *pkt, int slot,
				    __u32 value)
{
	if (pkt->dry)
		ctx_explain(ctx, slot, value);
}

static __always_inline void event_drop(struct ctx_buff *ctx, const struct packet *pkt, __u8 dir,
				       __u8 reason, __u32 service_id, __u32 rule_id)
{
	struct pyebpflb_flow_event *event = event_start(ctx, pkt, PYEBPFLB_EVENT_DROP, dir);

	if (!event)
		return;
	event->reason = reason;
	event->service_id = service_id;
	event->rule_id = rule_id;
	bpf_ringbuf_submit(event, 0);
}

/* Count a dropped (or refused) packet under `reason`, and tell user space. */
static __always_inline void note_drop(struct ctx_buff *ctx, const struct packet *pkt, __u8 dir,
				      __u8 reason, __u32 service_id, __u32 rule_id)
{
	explain(ctx, pkt, PYEBPFLB_EXPLAIN_DROP, reason);
	if (pkt->dry)
		return;
	count_drop(reason, ctx_len(ctx));
	event_drop(ctx, pkt, dir, reason, service_id, rule_id);
}

/* A new flow, translated: counted, and a trace event (a packet's on tc and XDP,
 * a connection's or datagram's at the socket, where the length is 0). */
static __always_inline void note_new_flow(struct ctx_buff *ctx, const struct packet *pkt,
					  const struct pyebpflb_backend *backend, __u32 service_id,
					  __u32 backend_id)
{
	struct pyebpflb_flow_event *event;

	explain(ctx, pkt, PYEBPFLB_EXPLAIN_SERVICE, service_id);
	explain(ctx, pkt, PYEBPFLB_EXPLAIN_BACKEND, backend_id);
	if (pkt->dry)
		return;
	count_new_flow(&lb_svc_stats, service_id, ctx_len(ctx));
	count_new_flow(&lb_be_stats, backend_id, ctx_len(ctx));
	event = event_start(ctx, pkt, PYEBPFLB_EVENT_TRACE, PYEBPFLB_POLICY_INGRESS);
	if (!event)
		return;
	event->nat_addr = backend->addr;
	event->nat_port = backend->port;
	event->service_id = service_id;
	event->backend_id = backend_id;
	bpf_ringbuf_submit(event, 0);
}

#endif
