/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The flow hash behind Maglev: MurmurHash3's mixing steps over the tuple, so
 * the same flow hashes alike on every host and every load balancer. */
#ifndef PYEBPFLB_BPF_HASH_H
#define PYEBPFLB_BPF_HASH_H

#include <linux/types.h>

#include "lib/parse.h"

static __always_inline __u32 hash_word(__u32 hash, __u32 word)
{
	word *= 0xcc9e2d51;
	word = (word << 15) | (word >> 17);
	word *= 0x1b873593;
	hash ^= word;
	hash = (hash << 13) | (hash >> 19);
	return hash * 5 + 0xe6546b64;
}

static __always_inline __u32 hash_final(__u32 hash)
{
	hash ^= hash >> 16;
	hash *= 0x85ebca6b;
	hash ^= hash >> 13;
	hash *= 0xc2b2ae35;
	return hash ^ (hash >> 16);
}

/* The flow's hash, or only its source address's under session affinity. A
 * function of its own (a BPF-to-BPF call): inlined at each of its callers it
 * would take the ingress program past the 512-byte stack. */
static __noinline __u32 flow_hash(const struct packet *pkt, int source_only)
{
	__u32 hash = 0x5eed;

	for (int i = 0; i < 4; i++)
		hash = hash_word(hash, pkt->saddr.v6[i]);
	if (source_only)
		return hash_final(hash);
	for (int i = 0; i < 4; i++)
		hash = hash_word(hash, pkt->daddr.v6[i]);
	hash = hash_word(hash, ((__u32)pkt->sport << 16) | pkt->dport);
	hash = hash_word(hash, pkt->proto);
	return hash_final(hash);
}

#endif
