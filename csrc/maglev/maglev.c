// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Maglev lookup table population (Eisenbud et al., NSDI 2016), with weights.
 * Built into the binding's extension: a Python loop over 16k-slot tables for
 * a thousand services would take tens of seconds.
 */
#include <stdint.h>
#include <string.h>

#include "maglev.h"

static uint32_t preferred(const uint32_t *offset, const uint32_t *skip, const uint32_t *next,
			  uint32_t i, uint32_t m)
{
	return (uint32_t)(((uint64_t)offset[i] + (uint64_t)next[i] * skip[i]) % m);
}

/*
 * Each round every backend earns its weight in credit and, when its credit
 * reaches the largest weight, takes the next free slot of its permutation
 * (offset + j * skip mod m, which visits every slot once since m is prime).
 * With equal weights this is the paper's round robin; with weights, slots
 * are shared in proportion to them. Weight 0 takes no slot.
 */
uint32_t pyebpflb_maglev_fill(const uint32_t *offset, const uint32_t *skip, const uint32_t *weight,
			      uint32_t n, uint32_t m, int32_t *table, uint32_t *next,
			      uint64_t *credit)
{
	uint32_t i, filled = 0, max_weight = 0;

	for (i = 0; i < m; i++)
		table[i] = -1;
	for (i = 0; i < n; i++) {
		next[i] = 0;
		credit[i] = 0;
		if (weight[i] > max_weight)
			max_weight = weight[i];
	}
	if (max_weight == 0)
		return 0;
	while (filled < m) {
		for (i = 0; i < n && filled < m; i++) {
			uint32_t slot;

			if (weight[i] == 0)
				continue;
			credit[i] += weight[i];
			if (credit[i] < max_weight)
				continue;
			credit[i] -= max_weight;
			slot = preferred(offset, skip, next, i, m);
			while (table[slot] >= 0) {
				next[i]++;
				slot = preferred(offset, skip, next, i, m);
			}
			table[slot] = (int32_t)i;
			next[i]++;
			filled++;
		}
	}
	return filled;
}
