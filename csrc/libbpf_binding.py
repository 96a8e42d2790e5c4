"""cffi build script (API mode) for the libbpf binding, pyebpflb._bpf._libbpf.

Run by setuptools through ``cffi_modules``; it produces the extension module
``pyebpflb._bpf._libbpf``. The struct layouts shared with the BPF programs are
not written here: they are read from ``csrc/include/pyebpflb/*.h`` by running
the C preprocessor over them, so the kernel side and the binding can never
disagree. The C compiler then checks every declaration below against the real
libbpf 1.1 headers.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import cffi

ROOT = pathlib.Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "csrc" / "include"
SHARED_HEADERS = sorted(p.name for p in (INCLUDE / "pyebpflb").glob("*.h") if p.name != "types.h")

KERNEL_TYPES = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed int __s32;
typedef signed long long __s64;
"""

LIBBPF_CDEF = """
/* --- libbpf logging ------------------------------------------------ */
enum libbpf_print_level { LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG };
extern "Python" void pyebpflb_on_libbpf_log(int level, const char *line);
void pyebpflb_install_libbpf_log(void);

__u32 libbpf_major_version(void);
__u32 libbpf_minor_version(void);
int libbpf_num_possible_cpus(void);
int libbpf_probe_bpf_prog_type(int prog_type, const void *opts);
int libbpf_probe_bpf_map_type(int map_type, const void *opts);

/* --- the start of a tc program's context, as BPF_PROG_TEST_RUN takes it --- */
struct __sk_buff { __u32 len; __u32 mark; __u32 cb[5]; ...; };

/* --- objects, programs, maps --------------------------------------- */
struct bpf_object;
struct bpf_program;
struct bpf_map;
struct bpf_link;

struct bpf_object_open_opts {
    size_t sz;
    const char *object_name;
    const char *pin_root_path;
    __u32 kernel_log_level;
    ...;
};

struct bpf_object *bpf_object__open_mem(const void *obj_buf, size_t obj_buf_sz,
                                        const struct bpf_object_open_opts *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
const char *bpf_object__name(const struct bpf_object *obj);
struct bpf_program *bpf_object__next_program(const struct bpf_object *obj,
                                             struct bpf_program *prog);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);

const char *bpf_program__name(const struct bpf_program *prog);
const char *bpf_program__section_name(const struct bpf_program *prog);
int bpf_program__fd(const struct bpf_program *prog);
int bpf_program__type(const struct bpf_program *prog);
int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);
struct bpf_link *bpf_program__attach_cgroup(const struct bpf_program *prog, int cgroup_fd);

const char *bpf_map__name(const struct bpf_map *map);
int bpf_map__fd(const struct bpf_map *map);
int bpf_map__type(const struct bpf_map *map);
__u32 bpf_map__key_size(const struct bpf_map *map);
__u32 bpf_map__value_size(const struct bpf_map *map);
__u32 bpf_map__max_entries(const struct bpf_map *map);
int bpf_map__set_max_entries(struct bpf_map *map, __u32 max_entries);
__u32 bpf_map__map_flags(const struct bpf_map *map);
int bpf_map__set_pin_path(struct bpf_map *map, const char *path);
const char *bpf_map__pin_path(const struct bpf_map *map);
bool bpf_map__is_pinned(const struct bpf_map *map);
bool bpf_map__is_internal(const struct bpf_map *map);
int bpf_map__reuse_fd(struct bpf_map *map, int fd);
int bpf_map__unpin(struct bpf_map *map, const char *path);

int bpf_link__fd(const struct bpf_link *link);
int bpf_link__destroy(struct bpf_link *link);
int bpf_link__pin(struct bpf_link *link, const char *path);
void bpf_link__disconnect(struct bpf_link *link);
int bpf_link_update(int link_fd, int new_prog_fd, const void *opts);
int bpf_link_detach(int link_fd);

/* --- BTF: names the C types of a map's key and value ---------------- */
struct btf;
struct btf_type { __u32 name_off; ...; };
#define BTF_KIND_INT ...
#define BTF_KIND_STRUCT ...
#define BTF_KIND_UNION ...
#define BTF_KIND_TYPEDEF ...
struct btf *bpf_object__btf(const struct bpf_object *obj);
const struct btf_type *btf__type_by_id(const struct btf *btf, __u32 id);
const char *btf__name_by_offset(const struct btf *btf, __u32 offset);
__u16 btf_kind(const struct btf_type *t);
__u32 bpf_map__btf_key_type_id(const struct bpf_map *map);
__u32 bpf_map__btf_value_type_id(const struct bpf_map *map);

/* --- raw syscalls (bpf.h) ------------------------------------------ */
struct bpf_map_create_opts { size_t sz; __u32 map_flags; ...; };
int bpf_map_create(int map_type, const char *map_name, __u32 key_size, __u32 value_size,
                   __u32 max_entries, const struct bpf_map_create_opts *opts);
int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_lookup_and_delete_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);

struct bpf_map_batch_opts { size_t sz; __u64 elem_flags; __u64 flags; ...; };
int bpf_map_delete_batch(int fd, const void *keys, __u32 *count,
                         const struct bpf_map_batch_opts *opts);
int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys, void *values,
                         __u32 *count, const struct bpf_map_batch_opts *opts);
int bpf_map_update_batch(int fd, const void *keys, const void *values, __u32 *count,
                         const struct bpf_map_batch_opts *opts);

int bpf_obj_pin(int fd, const char *pathname);
int bpf_obj_get(const char *pathname);
int bpf_prog_get_fd_by_id(__u32 id);
int bpf_map_get_fd_by_id(__u32 id);

struct bpf_prog_info { __u32 type; __u32 id; char name[16]; __u32 nr_map_ids; __u64 map_ids; ...; };
struct bpf_map_info { __u32 type; __u32 id; __u32 key_size; __u32 value_size; __u32 max_entries;
                      __u32 map_flags; char name[16]; ...; };
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, __u32 *info_len);

struct bpf_test_run_opts {
    size_t sz;
    const void *data_in;
    void *data_out;
    __u32 data_size_in;
    __u32 data_size_out;
    const void *ctx_in;
    void *ctx_out;
    __u32 ctx_size_in;
    __u32 ctx_size_out;
    __u32 retval;
    int repeat;
    __u32 duration;
    __u32 flags;
    ...;
};
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);

/* --- tc (netlink, clsact) ------------------------------------------- */
enum bpf_tc_attach_point { BPF_TC_INGRESS, BPF_TC_EGRESS, BPF_TC_CUSTOM, ... };
#define BPF_TC_F_REPLACE ...
struct bpf_tc_hook { size_t sz; int ifindex; enum bpf_tc_attach_point attach_point;
                     __u32 parent; ...; };
struct bpf_tc_opts { size_t sz; int prog_fd; __u32 flags; __u32 prog_id; __u32 handle;
                     __u32 priority; ...; };
int bpf_tc_hook_create(struct bpf_tc_hook *hook);
int bpf_tc_hook_destroy(struct bpf_tc_hook *hook);
int bpf_tc_attach(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);
int bpf_tc_detach(const struct bpf_tc_hook *hook, const struct bpf_tc_opts *opts);
int bpf_tc_query(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);

/* --- XDP (netlink) --------------------------------------------------- */
#define XDP_FLAGS_UPDATE_IF_NOEXIST ...
#define XDP_FLAGS_SKB_MODE ...
#define XDP_FLAGS_DRV_MODE ...
#define XDP_FLAGS_REPLACE ...
struct bpf_xdp_attach_opts { size_t sz; int old_prog_fd; ...; };
int bpf_xdp_attach(int ifindex, int prog_fd, __u32 flags, const struct bpf_xdp_attach_opts *opts);
int bpf_xdp_detach(int ifindex, __u32 flags, const struct bpf_xdp_attach_opts *opts);
int bpf_xdp_query_id(int ifindex, int flags, __u32 *prog_id);

/* --- ring buffer ----------------------------------------------------- */
struct ring_buffer;
extern "Python" int pyebpflb_on_ringbuf_sample(void *ctx, void *data, size_t size);
struct ring_buffer *ring_buffer__new(int map_fd, int (*sample_cb)(void *, void *, size_t),
                                     void *ctx, const void *opts);
void ring_buffer__free(struct ring_buffer *rb);
int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
int ring_buffer__consume(struct ring_buffer *rb);
int ring_buffer__epoll_fd(const struct ring_buffer *rb);

/* --- constants of the bpf(2) UAPI ------------------------------------ */
#define BPF_ANY ...
#define BPF_NOEXIST ...
#define BPF_EXIST ...
#define BPF_F_LOCK ...
#define BPF_MAP_TYPE_HASH ...
#define BPF_MAP_TYPE_ARRAY ...
#define BPF_MAP_TYPE_PERCPU_HASH ...
#define BPF_MAP_TYPE_PERCPU_ARRAY ...
#define BPF_MAP_TYPE_LRU_HASH ...
#define BPF_MAP_TYPE_LRU_PERCPU_HASH ...
#define BPF_MAP_TYPE_LPM_TRIE ...
#define BPF_MAP_TYPE_RINGBUF ...
#define BPF_MAP_TYPE_ARRAY_OF_MAPS ...
#define BPF_MAP_TYPE_HASH_OF_MAPS ...
#define BPF_F_INNER_MAP ...
#define BPF_PROG_TYPE_SCHED_CLS ...
#define BPF_PROG_TYPE_XDP ...
#define BPF_PROG_TYPE_CGROUP_SKB ...

/* --- Maglev table population (csrc/maglev) ---------------------------- */
uint32_t pyebpflb_maglev_fill(const uint32_t *offset, const uint32_t *skip, const uint32_t *weight,
                              uint32_t n, uint32_t m, int32_t *table, uint32_t *next,
                              uint64_t *credit);

/* --- namespaces and mounts (libc) ------------------------------------ */
#define CLONE_NEWNET ...
int setns(int fd, int nstype);
int mount(const char *source, const char *target, const char *filesystemtype,
          unsigned long mountflags, const void *data);
"""

SOURCE = """
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <linux/if_link.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <bpf/btf.h>
#include "maglev.h"
%(includes)s

static void pyebpflb_on_libbpf_log(int level, const char *line);

/* libbpf hands us printf-style arguments; Python cannot take a va_list, so
 * the message is formatted here, at whatever length it needs (verifier logs
 * run to megabytes). */
static int pyebpflb_libbpf_print(enum libbpf_print_level level, const char *fmt, va_list args)
{
    char small[512];
    va_list copy;
    int len;

    va_copy(copy, args);
    len = vsnprintf(small, sizeof(small), fmt, copy);
    va_end(copy);
    if (len < 0)
        return 0;
    if ((size_t)len < sizeof(small)) {
        pyebpflb_on_libbpf_log(level, small);
        return 0;
    }
    char *big = malloc((size_t)len + 1);
    if (!big)
        return 0;
    vsnprintf(big, (size_t)len + 1, fmt, args);
    pyebpflb_on_libbpf_log(level, big);
    free(big);
    return 0;
}

static void pyebpflb_install_libbpf_log(void)
{
    libbpf_set_print(pyebpflb_libbpf_print);
}
"""


def _shared_cdef() -> str:
    """The shared layouts, preprocessed into plain declarations cffi can parse."""
    wrapper = "".join(f"#include <pyebpflb/{name}>\n" for name in SHARED_HEADERS)
    cc = os.environ.get("CC", "cc")
    result = subprocess.run(
        [cc, "-E", "-P", "-DPYEBPFLB_CDEF", "-I", str(INCLUDE), "-x", "c", "-"],
        input=wrapper,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


ffibuilder = cffi.FFI()
ffibuilder.cdef(KERNEL_TYPES + LIBBPF_CDEF + _shared_cdef())
ffibuilder.set_source(
    "pyebpflb._bpf._libbpf",
    SOURCE % {"includes": "".join(f'#include "pyebpflb/{n}"\n' for n in SHARED_HEADERS)},
    sources=["csrc/maglev/maglev.c"],  # relative: setuptools places objects by this path
    libraries=["bpf"],
    include_dirs=[str(INCLUDE), str(ROOT / "csrc" / "maglev")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
