// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Socket-level balancing on cgroup v2 (lib/sock.h has the steps): connect()
 * and sendmsg() to a service are pointed at a backend at the socket,
 * recvmsg() and getpeername() show the service again. Its maps are the tc
 * datapath's, reused at load, so both paths share services, counters, policy
 * and events.
 */
#define PYEBPFLB_CTX_SOCK

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/sock.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/connect4")
int lb_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_translate(ctx, ctx->sk ? ctx->sk->src_ip4 : 0);
}

SEC("cgroup/sendmsg4")
int lb_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_translate(ctx, ctx->msg_src_ip4);
}

SEC("cgroup/recvmsg4")
int lb_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("cgroup/getpeername4")
int lb_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("cgroup/connect6")
int lb_connect6(struct bpf_sock_addr *ctx)
{
	__u32 src[4] = {};

	if (ctx->sk)
		for (int i = 0; i < 4; i++)
			src[i] = ctx->sk->src_ip6[i];
	return sock6_translate(ctx, src);
}

SEC("cgroup/sendmsg6")
int lb_sendmsg6(struct bpf_sock_addr *ctx)
{
	__u32 src[4];

	for (int i = 0; i < 4; i++)
		src[i] = ctx->msg_src_ip6[i];
	return sock6_translate(ctx, src);
}

SEC("cgroup/recvmsg6")
int lb_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_reverse(ctx);
}

SEC("cgroup/getpeername6")
int lb_getpeername6(struct bpf_sock_addr *ctx)
{
	return sock6_reverse(ctx);
}
