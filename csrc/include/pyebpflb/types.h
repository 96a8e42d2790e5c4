/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Fixed-width kernel types for every shared layout.
 *
 * The BPF programs get them from the kernel UAPI headers. The cffi build
 * preprocesses the headers with PYEBPFLB_CDEF defined and declares the same
 * typedefs itself, because cffi's parser cannot read system headers.
 */
#ifndef PYEBPFLB_TYPES_H
#define PYEBPFLB_TYPES_H

#ifndef PYEBPFLB_CDEF
#include <linux/types.h>
#endif

#endif
