/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Internet checksum arithmetic (RFC 1071, RFC 1624) in one's complement,
 * for the places where a checksum is written directly instead of through a
 * kernel helper: headers built from scratch, the IPv4 header of the fast NAT
 * path, and every checksum of an XDP program (lib/ctx.h).
 *
 * The sums are taken over 16-bit words as they lie in memory. One's
 * complement addition does not care about byte order, so values loaded
 * from the packet and the checksum field combine without byte swaps.
 */
#ifndef PYEBPFLB_BPF_CSUM_H
#define PYEBPFLB_BPF_CSUM_H

#include <linux/types.h>

/* A 64-bit running sum folded to 16 bits and complemented: a checksum. */
static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* HC' = ~(~HC + ~m + m') (RFC 1624, eqn. 3) for a 16-bit field. */
static __always_inline __u16 csum_update2(__u16 check, __u16 from, __u16 to)
{
	return csum_fold((__u16)~check + (__u16)~from + (__u64)to);
}

/* The same for a 32-bit field: its two 16-bit halves. */
static __always_inline __u16 csum_update4(__u16 check, __u32 from, __u32 to)
{
	return csum_fold((__u64)(__u16)~check + (__u16)~from + (__u16) ~(from >> 16) + (__u16)to +
			 (__u16)(to >> 16));
}

/* Fold a partial sum (bpf_csum_diff's result: new words minus old) into a
 * checksum, as the kernel's inet_proto_csum_replace_by_diff does. */
static __always_inline __u16 csum_update_diff(__u16 check, __u32 diff)
{
	return csum_fold((__u64)(__u16)~check + diff);
}

#endif
