/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
#ifndef PYEBPFLB_MAGLEV_H
#define PYEBPFLB_MAGLEV_H

#include <stdint.h>

/* Fills table[0..m) with backend indexes (-1 where no backend has weight);
 * next and credit are scratch arrays of n. Returns the number of filled slots. */
uint32_t pyebpflb_maglev_fill(const uint32_t *offset, const uint32_t *skip, const uint32_t *weight,
			      uint32_t n, uint32_t m, int32_t *table, uint32_t *next,
			      uint64_t *credit);

#endif
