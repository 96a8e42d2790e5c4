/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Layouts of the service load balancer (lb.bpf.c): the one definition read
 * by the BPF C and by the Python binding. Addresses and ports are kept in
 * network byte order, exactly as they appear in packets.
 */
#ifndef PYEBPFLB_LB_H
#define PYEBPFLB_LB_H

#include "pyebpflb/types.h"
#include "pyebpflb/counter.h"

#define PYEBPFLB_NAME_MAX	   256
#define PYEBPFLB_DATAPATH_NAME_MAX 64

/* Address family tags of keys and values (not the AF_* numbers). */
enum pyebpflb_family {
	PYEBPFLB_IPV4 = 4,
	PYEBPFLB_IPV6 = 6,
};

/* An IPv4 address sits in v4 with the remaining 12 bytes zero. */
union pyebpflb_addr {
	__u32 v4;
	__u32 v6[4];
	__u8 bytes[16];
};

/* lb_services: (VIP, port, protocol) -> service. */
struct pyebpflb_service_key {
	union pyebpflb_addr vip;
	__u16 port; /* network order */
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;
};

/*
 * New flows pick from the service's slots: one per usable backend, in one of
 * two generations. An update writes the generation packets do not read, then
 * flips `gen` (and `count`) in one atomic replace of this value: a packet sees
 * the old set or the new one, never a mix.
 */
enum pyebpflb_service_flags {
	PYEBPFLB_SERVICE_MAGLEV = 1, /* new flows: lb_maglev[id][hash % maglev_table_size] */
};

struct pyebpflb_service {
	__u32 id;
	__u32 count; /* slots in the current generation; 0: refuse */
	__u8 gen;    /* 0 or 1 */
	__u8 flags;  /* enum pyebpflb_service_flags */
	__u16 _pad;
	__u32 affinity_timeout_s; /* 0: no session affinity */
};

/* lb_slots: (service id, generation << 31 | slot) -> slot. Slots count from 1. */
struct pyebpflb_slot_key {
	__u32 service_id;
	__u32 slot;
};

enum {
	PYEBPFLB_SLOT_GEN_SHIFT = 31,
};

/*
 * Weighted choice in O(1) (Walker's alias method): a uniformly drawn slot
 * sends the flow to `backend_id` when a second draw is below `threshold`
 * (out of 2^32), else to `alias_id`. The weights are folded in by user space.
 */
struct pyebpflb_slot {
	__u32 backend_id;
	__u32 alias_id;
	__u32 threshold;
};

enum pyebpflb_backend_state {
	PYEBPFLB_BACKEND_ACTIVE = 0,
	PYEBPFLB_BACKEND_TERMINATING = 1,
	PYEBPFLB_BACKEND_MAINTENANCE = 2,
};

/*
 * lb_backends: backend id -> where to send. Ids are never reused. Every
 * backend of a service is here, usable or not (its flows go on); `weight`,
 * `state` and `position` are for reading the service back.
 */
struct pyebpflb_backend {
	union pyebpflb_addr addr;
	__u16 port; /* network order */
	__u8 family;
	__u8 state; /* enum pyebpflb_backend_state */
	__u32 service_id;
	__u16 weight;
	__u16 position; /* in the service's list of backends */
	__u8 usable;	/* takes new flows now (affinity may return to it) */
	__u8 _pad[3];
};

/* lb_affinity: (service, client address) -> the backend of its last new flow. */
struct pyebpflb_affinity_key {
	union pyebpflb_addr client;
	__u32 service_id;
	__u8 family;
	__u8 _pad[3];
};

struct pyebpflb_affinity {
	__u32 backend_id;
	__u32 _pad;
	__u64 last_seen_ns;
};

enum pyebpflb_ct_dir {
	PYEBPFLB_CT_SERVICE = 0, /* client -> VIP: the key of a translated flow */
	PYEBPFLB_CT_REPLY = 1,	 /* backend -> client: how to translate replies */
};

/* lb_ct: a flow's tuple as seen on the wire, in one direction. */
struct pyebpflb_ct_key {
	union pyebpflb_addr saddr;
	union pyebpflb_addr daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u8 dir; /* enum pyebpflb_ct_dir */
	__u8 _pad;
};

enum pyebpflb_ct_flags {
	PYEBPFLB_CT_SEEN_REPLY = 1, /* the backend has answered */
	PYEBPFLB_CT_CLOSING = 2,    /* FIN or RST seen: short timeout */
};

/*
 * For a SERVICE entry nat_addr/nat_port are the backend's; for a REPLY entry
 * they are the VIP's, which replies must carry as their source.
 */
struct pyebpflb_ct_entry {
	union pyebpflb_addr nat_addr;
	__u16 nat_port; /* network order */
	__u8 flags;	/* enum pyebpflb_ct_flags */
	__u8 _pad;
	__u32 backend_id;
	__u32 service_id;
	__u32 _pad2;
	__u64 created_ns;
	__u64 last_seen_ns;
};

/* Why a packet was dropped: the index of lb_drops. */
enum pyebpflb_drop_reason {
	PYEBPFLB_DROP_NONE = 0,
	PYEBPFLB_DROP_NO_BACKEND = 1,
	PYEBPFLB_DROP_CT_FULL = 2,
	PYEBPFLB_DROP_REJECT_FAILED = 3,
	PYEBPFLB_DROP_MAX = 16,
};

#define PYEBPFLB_LB_MAPS_MAX 16

/*
 * lb_config: the single entry; timeouts are read by the datapath, the rest by
 * user space. map_ids lists every map of the datapath, so a process that finds
 * the programs on an interface (but no pins: another bpffs) finds all the
 * maps, also those no program uses.
 */
struct pyebpflb_lb_config {
	__u64 ct_tcp_syn_ns;
	__u64 ct_tcp_established_ns;
	__u64 ct_tcp_closing_ns;
	__u64 ct_udp_ns;
	__u32 next_service_id;
	__u32 next_backend_id;
	__u32 layout_version;
	__u32 maglev_table_size; /* a prime; every Maglev table of the datapath has it */
	char name[PYEBPFLB_DATAPATH_NAME_MAX];
	__u32 map_ids[PYEBPFLB_LB_MAPS_MAX];
};

/* lb_svc_names: service id -> its name (user space only). */
struct pyebpflb_service_name {
	char name[PYEBPFLB_NAME_MAX];
};

#endif
