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
#define PYEBPFLB_RULE_ORIGIN_MAX   64

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
	/* internalTrafficPolicy Local: the slots hold this node's backends only, and
	 * none means drop (kube-proxy's "has no local endpoints"), not refuse. */
	PYEBPFLB_SERVICE_LOCAL_ONLY = 2,
	PYEBPFLB_SERVICE_SOURCE_RANGES = 4, /* new flows only from lb_src_ranges' CIDRs */
	PYEBPFLB_SERVICE_DSR = 8, /* external traffic to a remote backend: DSR, not SNAT */
};

/* What a service entry is a frontend of (Cilium's service types): read back
 * by user space; for packets, LOCAL_ONLY of a NodePort, external or
 * load-balancer entry is externalTrafficPolicy's. */
enum pyebpflb_service_kind {
	PYEBPFLB_KIND_CLUSTER_IP = 0,
	PYEBPFLB_KIND_NODE_PORT = 1, /* its key's address is 0: every lb_nodeport address */
	PYEBPFLB_KIND_EXTERNAL_IP = 2,
	PYEBPFLB_KIND_LOAD_BALANCER = 3,
};

struct pyebpflb_service {
	__u32 id;
	__u32 count; /* slots in the current generation; 0: refuse */
	__u8 gen;    /* 0 or 1 */
	__u8 flags;  /* enum pyebpflb_service_flags */
	__u8 kind;   /* enum pyebpflb_service_kind */
	__u8 _pad;
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
	/* 1 << gen for each generation of its service's entry it is a member of
	 * (user space only: a change interrupted before its cleanup leaves
	 * backends that are members of one generation only). */
	__u8 gens;
	__u8 remote; /* runs on another node than the datapath's (external traffic: SNAT or DSR) */
	__u8 _pad;
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
	PYEBPFLB_CT_SERVICE = 0,    /* client -> VIP: the key of a translated flow */
	PYEBPFLB_CT_REPLY = 1,	    /* backend -> client: how to translate replies */
	PYEBPFLB_CT_POLICY_IN = 2,  /* a reply arriving on ingress to a flow policy let out */
	PYEBPFLB_CT_POLICY_OUT = 3, /* a reply leaving on egress to a flow policy let in */
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
	PYEBPFLB_CT_SEEN_REPLY = 1,  /* the backend has answered */
	PYEBPFLB_CT_CLOSING = 2,     /* RST, or FIN from both sides: short timeout */
	PYEBPFLB_CT_FIN_CLIENT = 4,  /* the client sent FIN (half-closed) */
	PYEBPFLB_CT_FIN_BACKEND = 8, /* the backend sent FIN */
	PYEBPFLB_CT_HAIRPIN = 16,    /* the client is its own backend: its source is
					lb_config's hairpin address on the way in */
	PYEBPFLB_CT_SNAT = 32,	     /* external traffic to a remote backend: the source
					becomes this node's (lb_snat), the packet goes back out */
	PYEBPFLB_CT_DSR = 64,	     /* external traffic to a remote backend by direct server
					return: its answers never come back here (lib/dsr.h); on
					the backend's node, a flow its first packet announced */
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

/* The conntrack tables (lib/ct.h): the index of lb_ct_stats. */
enum pyebpflb_ct_table {
	PYEBPFLB_CT_TCP = 0,	 /* lb_ct: TCP flows the backend answered */
	PYEBPFLB_CT_TCP_SYN = 1, /* lb_ct_syn: TCP flows it has not answered */
	PYEBPFLB_CT_UDP = 2,	 /* lb_ct_udp */
	PYEBPFLB_CT_TABLES = 3,
};

/* lb_ct_stats (per-CPU array, one per table): what happened to its flows. */
struct pyebpflb_ct_stats {
	__u64 created;	 /* flows made in this table */
	__u64 confirmed; /* moved on to lb_ct by the backend's first answer */
	__u64 orphaned;	 /* a reply half met whose flow half the LRU had evicted */
	__u64 healed;	 /* a flow's lost reply half restored */
	__u64 collected; /* entries the user-space collector deleted (CPU 0's slot) */
};

/* Why a packet was dropped: the index of lb_drops. */
enum pyebpflb_drop_reason {
	PYEBPFLB_DROP_NONE = 0,
	PYEBPFLB_DROP_NO_BACKEND = 1,
	PYEBPFLB_DROP_CT_FULL = 2,
	PYEBPFLB_DROP_REJECT_FAILED = 3,
	PYEBPFLB_DROP_POLICY_DENIED = 4,    /* a deny rule, or no allow under default deny */
	PYEBPFLB_DROP_MALFORMED = 5,	    /* under policy: headers that do not add up */
	PYEBPFLB_DROP_UNSUPPORTED = 6,	    /* under policy: no transport header found */
	PYEBPFLB_DROP_TUPLE_IN_USE = 7,	    /* a live flow holds the backend's side of the tuple */
	PYEBPFLB_DROP_BACKEND_GONE = 8,	    /* TCP of a flow whose backend left: reset */
	PYEBPFLB_DROP_NO_LOCAL_BACKEND = 9, /* internalTrafficPolicy Local, none on this node */
	PYEBPFLB_DROP_NO_SERVICE_PORT =
	    10,				 /* a service address, on a port none of its services has */
	PYEBPFLB_DROP_SOURCE_RANGE = 11, /* a load-balancer IP, from outside its source ranges */
	PYEBPFLB_DROP_NO_NAT_PORT = 12,	 /* SNAT found no free port for the backend */
	PYEBPFLB_DROP_NO_ROUTE = 13,	 /* a translated packet to send back out has no route */
	PYEBPFLB_DROP_MAX = 16,
};

/*
 * Flow events, one BPF ring buffer (lb_events) for all: a new flow translated
 * (TRACE), a packet dropped or refused (DROP, with its reason), a policy
 * verdict on a new flow or a denied packet (POLICY). Every CPU sends at most
 * lb_config.event_rate a second; what the limit holds back and what does not
 * fit the ring are counted in lb_event_stats, never silently lost.
 */
enum pyebpflb_event_type {
	PYEBPFLB_EVENT_TRACE = 1,
	PYEBPFLB_EVENT_DROP = 2,
	PYEBPFLB_EVENT_POLICY = 3,
};

/*
 * Explain (Datapath.explain) runs a packet through BPF_PROG_TEST_RUN with
 * skb->mark == PYEBPFLB_EXPLAIN_MARK: the programs decide as for real traffic,
 * write no map, and report their decisions in skb->cb[slot]. The POLICY slot
 * holds 1 + enum pyebpflb_policy_action, | PYEBPFLB_EXPLAIN_DEFAULT when the
 * direction's default decided.
 */
enum pyebpflb_explain {
	PYEBPFLB_EXPLAIN_SERVICE = 0,
	PYEBPFLB_EXPLAIN_BACKEND = 1,
	PYEBPFLB_EXPLAIN_RULE = 2,
	PYEBPFLB_EXPLAIN_POLICY = 3,
	PYEBPFLB_EXPLAIN_DROP = 4, /* enum pyebpflb_drop_reason */
	PYEBPFLB_EXPLAIN_SLOTS = 5,
	PYEBPFLB_EXPLAIN_ACTION_MASK = 0x0f,
	PYEBPFLB_EXPLAIN_DEFAULT = 0x10,
	PYEBPFLB_EXPLAIN_MARK = 0xeb1be791,
};

struct pyebpflb_flow_event {
	__u64 time_ns; /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
	union pyebpflb_addr saddr;
	union pyebpflb_addr daddr;
	union pyebpflb_addr nat_addr; /* TRACE: the backend */
	__u16 sport;		      /* network order, as daddr etc.; ICMP: type and code */
	__u16 dport;
	__u16 nat_port;
	__u8 type;   /* enum pyebpflb_event_type */
	__u8 reason; /* DROP: enum pyebpflb_drop_reason */
	__u8 family;
	__u8 proto;
	__u8 dir;     /* enum pyebpflb_policy_dir: the hook that saw the packet */
	__u8 verdict; /* POLICY: enum pyebpflb_policy_action; 0 for a direction's default */
	__u8 is_reply;
	__u8 is_default; /* POLICY: no rule matched, the direction's default decided */
	__u16 _pad;
	__u32 ifindex;
	__u32 service_id;
	__u32 backend_id;
	__u32 rule_id;
	__u32 len;
};

/* lb_event_stats (per-CPU array[1]): the rate limit's window and what happened. */
struct pyebpflb_event_stats {
	__u64 window_ns;
	__u64 in_window;
	__u64 sent;
	__u64 lost;	    /* the ring was full */
	__u64 rate_limited; /* over lb_config.event_rate in a second, on one CPU */
};

#define PYEBPFLB_LB_MAPS_MAX 32

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
	__u32 policy_active;	 /* 1 once policies were installed: read lb_policy */
	__u32 next_rule_id;
	__u32 next_policy_id;
	__u32 event_mask; /* 1 << enum pyebpflb_event_type: which events are sent */
	__u32 event_rate; /* events a second per CPU; 0: none */
	/* Which map holds the services packets see: 0 lb_services, 1
	 * lb_services_alt. A change writes the other one, then flips this: every
	 * service changes at once. PYEBPFLB_CHANGE_OPEN is set while a change runs
	 * (user space only: a writer that finds it set finishes a dead one's). */
	__u32 service_map;
	__u64 changes; /* bumped by every change: a writer whose copy is older reads again */
	char name[PYEBPFLB_DATAPATH_NAME_MAX];
	__u32 map_ids[PYEBPFLB_LB_MAPS_MAX];
	/* The source a backend sees when it reached itself through a VIP. */
	union pyebpflb_addr hairpin_v4;
	union pyebpflb_addr hairpin_v6;
	/* SNAT of external traffic to remote backends (layout 7): the mappings'
	 * idle timeouts and the source ports they take (host order, inclusive). */
	__u64 snat_tcp_ns;
	__u64 snat_udp_ns;
	__u16 snat_port_min;
	__u16 snat_port_max;
	__u32 _pad_snat;
};

enum pyebpflb_service_map {
	PYEBPFLB_SERVICE_MAP_ALT = 1,	/* packets read lb_services_alt */
	PYEBPFLB_CHANGE_OPEN = 1 << 8,	/* a change is under way */
	PYEBPFLB_MAGLEV_GEN_SHIFT = 31, /* lb_maglev key: service id | gen << 31 */
};

/* lb_svc_names: service id -> its name (user space only). */
struct pyebpflb_service_name {
	char name[PYEBPFLB_NAME_MAX];
};

/*
 * Network policy. Rules are compiled by user space into two LPM tries: the
 * peer's address finds its class (the most specific CIDR any rule names; its
 * entry folds in the rules of every CIDR containing it), then (class,
 * protocol, port) finds the verdict of the port range the port falls in, with
 * deny-beats-allow and most-specific-prefix already resolved. Two lookups,
 * whatever the number of rules. A change writes a whole new generation, then
 * flips lb_policy to it.
 */
enum pyebpflb_policy_dir {
	PYEBPFLB_POLICY_INGRESS = 0,
	PYEBPFLB_POLICY_EGRESS = 1,
};

enum pyebpflb_policy_action {
	PYEBPFLB_POLICY_NONE = 0, /* no rule matches: the direction's default */
	PYEBPFLB_POLICY_ALLOW = 1,
	PYEBPFLB_POLICY_DENY = 2, /* greater than ALLOW: deny beats allow */
};

/* What a rule's protocol is matched against. A later fragment whose first
 * fragment was not seen has no ports: *_NOPORT, matched by rules for every port. */
enum pyebpflb_policy_proto {
	PYEBPFLB_POLICY_TCP = 1,
	PYEBPFLB_POLICY_UDP = 2,
	PYEBPFLB_POLICY_ICMP = 3, /* ICMP or ICMPv6 */
	PYEBPFLB_POLICY_OTHER = 4,
	PYEBPFLB_POLICY_TCP_NOPORT = 5,
	PYEBPFLB_POLICY_UDP_NOPORT = 6,
	PYEBPFLB_POLICY_SCTP = 7, /* with PYEBPFLB_POLICY_SCTP_PIECES, else OTHER */
	PYEBPFLB_POLICY_SCTP_NOPORT = 8,
};

enum pyebpflb_policy_flags {
	PYEBPFLB_POLICY_ON = 1,		   /* the direction has policies */
	PYEBPFLB_POLICY_DEFAULT_DENY = 2,  /* ... and one of them denies by default */
	PYEBPFLB_POLICY_SERVICE_RULES = 4, /* ... and a rule names a service */
	PYEBPFLB_POLICY_SUBJECTS = 8,	   /* ... and a policy is for some endpoints only */
	PYEBPFLB_POLICY_SCTP_PIECES = 16,  /* ... and classes have SCTP's own (layout 9 on) */
	/* ... and a policy for every endpoint has rules: an endpoint with a rule set also
	 * meets scope 0's (rule sets written without this flag hold them themselves) */
	PYEBPFLB_POLICY_EVERYONE = 32,
};

enum {
	PYEBPFLB_POLICY_GEN_SHIFT = 31,
	/* A scope with this bit is a rule set of endpoints (lb_pol_subjects), its
	 * other bits the set's number; without it, a service id (0: the rules of
	 * every endpoint). */
	PYEBPFLB_POLICY_RULESET = 1 << 30,
	PYEBPFLB_POLICY_CIDR_FIXED_BITS = 64, /* scope, dir, family, _pad */
	PYEBPFLB_POLICY_PORT_FIXED_BITS = 48, /* class_id, proto, _pad */
};

/* lb_policy: key 0 -> the generation in force and each direction's flags. */
struct pyebpflb_policy_head {
	__u32 gen;
	__u8 ingress; /* enum pyebpflb_policy_flags */
	__u8 egress;
	__u16 _pad;
};

/*
 * A port range of a class and its verdict. A class of at most
 * PYEBPFLB_POLICY_INLINE ranges (over all protocols) carries them in its
 * lb_pol_cidrs value, which saves the second lookup; a larger one is in
 * lb_pol_ports.
 */
struct pyebpflb_policy_piece {
	__u16 port_low; /* host order, inclusive; 0 and 65535 for protocols without ports */
	__u16 port_high;
	__u8 proto;  /* enum pyebpflb_policy_proto; 0: unused */
	__u8 action; /* enum pyebpflb_policy_action */
	__u8 prefixlen;
	__u8 _pad;
	__u32 rule_id;
};

enum {
	PYEBPFLB_POLICY_INLINE = 4,
	/* The proto of an inline piece for every protocol, last in its class: the
	 * protocols with pieces of their own meet those first. */
	PYEBPFLB_POLICY_PIECE_EVERY = 255,
};

struct pyebpflb_policy_class {
	__u32 class_id; /* gen << 31 | class, the key of lb_pol_ports when spilled */
	__u32 spilled;	/* 1: the ranges are in lb_pol_ports, not below */
	struct pyebpflb_policy_piece pieces[PYEBPFLB_POLICY_INLINE];
};

/* lb_pol_cidrs (LPM trie): the peer's address -> its class. */
struct pyebpflb_policy_cidr_key {
	__u32 prefixlen; /* PYEBPFLB_POLICY_CIDR_FIXED_BITS + the CIDR's */
	__u32 scope;	 /* gen << 31 | service id (0: rules on the real destination) */
	__u8 dir;	 /* enum pyebpflb_policy_dir */
	__u8 family;
	__u16 _pad;
	union pyebpflb_addr addr;
};

/* lb_pol_ports (LPM trie): (class, protocol, destination port) -> verdict. */
struct pyebpflb_policy_port_key {
	__u32 prefixlen; /* PYEBPFLB_POLICY_PORT_FIXED_BITS + the port prefix's */
	__u32 class_id;	 /* gen << 31 | class */
	__u8 proto;	 /* enum pyebpflb_policy_proto */
	__u8 _pad;
	__u16 port; /* network order, so the trie's prefixes are the port's high bits */
};

struct pyebpflb_policy_verdict {
	__u32 rule_id;
	__u8 action;	 /* enum pyebpflb_policy_action */
	__u8 prefixlen;	 /* the rule's CIDR's: of two scopes' verdicts, the longer wins */
	__u8 is_default; /* set by the datapath: no rule matched (rule_id 0) */
	__u8 _pad;
};

/* lb_pol_rules: rule id -> the rule, for reading policies back (user space only). */
struct pyebpflb_policy_rule {
	union pyebpflb_addr addr;
	__u8 family; /* 0: every address */
	__u8 prefixlen;
	__u8 action;
	__u8 proto; /* enum pyebpflb_policy_proto, 0: any */
	__u16 port_low;
	__u16 port_high; /* host order; 0 and 0: every port */
	__u32 policy_id;
	__u32 index; /* in its policy */
	char service[PYEBPFLB_NAME_MAX];
	char origin[PYEBPFLB_RULE_ORIGIN_MAX]; /* where the rule comes from; "": not said */
};

/*
 * lb_pol_addrs (hash) and lb_pol_subjects (LPM trie): an endpoint's address
 * (the destination on ingress, the source on egress) -> the rule set of the
 * policies for it. A subject of one address is in the hash (prefixlen 0), a
 * wider one in the trie, looked up when the hash has no entry. An address
 * neither holds gets the rules of every endpoint (scope 0) and the direction's
 * flags in lb_policy.
 */
struct pyebpflb_policy_subject_key {
	__u32 prefixlen; /* the trie's: PYEBPFLB_POLICY_CIDR_FIXED_BITS + the CIDR's; 0 */
	__u32 gen;	 /* gen << 31 */
	__u8 dir;	 /* enum pyebpflb_policy_dir */
	__u8 family;
	__u16 _pad;
	union pyebpflb_addr addr;
};

struct pyebpflb_policy_subject {
	__u32 scope; /* PYEBPFLB_POLICY_RULESET | the rule set */
	__u8 flags;  /* enum pyebpflb_policy_flags of the policies for it */
	__u8 _pad[3];
};

/* lb_pol_members: (policy id, index) -> a subject of the policy (user space only). */
struct pyebpflb_policy_member_key {
	__u32 policy_id;
	__u32 index;
};

struct pyebpflb_policy_member {
	union pyebpflb_addr addr;
	__u8 family;
	__u8 prefixlen;
	__u16 _pad;
};

/* lb_pol_names: policy id -> what the rules belong to (user space only). */
struct pyebpflb_policy_info {
	char name[PYEBPFLB_NAME_MAX];
	__u8 dir;
	__u8 default_deny;
	__u16 _pad;
	__u32 rules;
};

/* lb_frags: the ports of a first fragment, for the later fragments of its datagram. */
struct pyebpflb_frag_key {
	union pyebpflb_addr saddr;
	union pyebpflb_addr daddr;
	__u32 id;
	__u8 proto;
	__u8 family;
	__u16 _pad;
};

struct pyebpflb_frag_ports {
	__u16 sport;
	__u16 dport;
};

/*
 * lb_frag_nat: (the datagram's addresses as it arrived, id, protocol) -> what
 * its first fragment was translated to, for the later fragments, which carry
 * no ports: the L3 rewrite of the first, on both directions.
 */
enum pyebpflb_frag_rewrite {
	PYEBPFLB_FRAG_SADDR = 1,
	PYEBPFLB_FRAG_DADDR = 2,
};

struct pyebpflb_frag_nat {
	union pyebpflb_addr saddr;
	union pyebpflb_addr daddr;
	__u8 rewrite; /* enum pyebpflb_frag_rewrite */
	__u8 _pad[3];
};

/*
 * lb_node (array[1]): the node this datapath serves. The socket programs
 * translate only sockets of the network namespace whose cookie is here; the
 * addresses stand for a local client's source where its socket has none yet.
 */
#define PYEBPFLB_NODE_NAME_MAX 64

struct pyebpflb_node {
	__u64 netns_cookie; /* 0: not written yet, no socket is translated */
	union pyebpflb_addr v4;
	union pyebpflb_addr v6;
	char name[PYEBPFLB_NODE_NAME_MAX];
	char zone[PYEBPFLB_NODE_NAME_MAX];
};

/* lb_be_nodes: backend id -> the node it runs on (user space only; none: no entry). */
struct pyebpflb_node_name {
	char name[PYEBPFLB_NODE_NAME_MAX];
};

/* lb_vips: every address some service has -> how many services it has, so that
 * a port none of them has is refused (kube-proxy's nftables mode). */
struct pyebpflb_vip_key {
	union pyebpflb_addr vip;
	__u8 family;
	__u8 _pad[3];
};

/*
 * lb_sock_revnat (LRU): what a socket was translated to -> the service address
 * it asked for, so recvmsg() and getpeername() show the VIP. Keyed by the
 * socket's cookie and the backend's address and port (Cilium's
 * cilium_lb4_reverse_sk).
 */
struct pyebpflb_sock_key {
	__u64 cookie;
	union pyebpflb_addr addr; /* the backend */
	__u16 port;		  /* network order */
	__u8 family;
	__u8 _pad[5];
};

struct pyebpflb_sock_revnat {
	union pyebpflb_addr vip;
	__u16 port; /* network order */
	__u8 family;
	__u8 _pad;
	__u32 service_id;
};

/*
 * lb_snat (LRU): SNAT mappings of external flows to remote backends, in two
 * directions under a pyebpflb_ct_key whose dir is below: OUT, the flow as it
 * leaves (client -> backend, after DNAT) -> the node's address and the port
 * it took; IN, the backend's answer (backend -> node:port) -> the client it
 * goes back to (Cilium's SNAT_MAPPING_IPV4/6).
 */
enum pyebpflb_snat_dir {
	PYEBPFLB_SNAT_OUT = 0,
	PYEBPFLB_SNAT_IN = 1,
};

enum pyebpflb_snat_flags {
	PYEBPFLB_SNAT_CLOSING = 1, /* this half saw a FIN or RST: the closing timeout */
};

struct pyebpflb_snat_entry {
	union pyebpflb_addr addr; /* OUT: the node's; IN: the client's */
	__u16 port;		  /* network order */
	__u8 flags;		  /* enum pyebpflb_snat_flags */
	__u8 _pad[5];
	__u64 created_ns;
	__u64 last_seen_ns;
};

/* lb_src_ranges (LPM trie): (load-balancer frontend, client CIDR) -> 1. */
enum {
	PYEBPFLB_SRC_RANGE_FIXED_BITS = 64, /* service_id, family, _pad */
};

struct pyebpflb_src_range_key {
	__u32 prefixlen; /* PYEBPFLB_SRC_RANGE_FIXED_BITS + the CIDR's */
	__u32 service_id;
	__u8 family;
	__u8 _pad[3];
	union pyebpflb_addr addr;
};

/* lb_frontends (user space only): a frontend made from a Service's NodePort,
 * external or load-balancer IPs (and that Service's ClusterIP entry) -> the
 * ClusterIP service key they belong to, for reading the Service back whole. */
struct pyebpflb_frontend {
	struct pyebpflb_service_key origin;
	__u16 health_check_port; /* 0: none */
	__u16 _pad;
};

#endif
