"""Commands for a datapath's life: list them all, attach, detach, destroy."""

from __future__ import annotations

import click

from pyebpflb.cli.base import OUTPUT, Context, emit, main_group, pass_context


@main_group.group("datapath")
def datapath_group() -> None:
    """Every datapath on the host."""


@datapath_group.command("list")
@OUTPUT
@pass_context
def datapath_list(ctx: Context, output: str) -> None:
    """Every datapath on the host and in every network namespace: where it is attached,
    where its state lives, its layout and writer; orphans (pins of a gone namespace)."""
    from pyebpflb.datapath import DEFAULT_PIN_ROOT, lifecycle

    found = lifecycle.datapaths(ctx.pin_root or DEFAULT_PIN_ROOT)
    emit(
        output,
        [d.to_dict() for d in found],
        lambda: (
            [
                (
                    d.name,
                    d.netns or ("(host)" if not d.orphan else "(gone)"),
                    ",".join(d.interfaces) or "-",
                    d.pin_dir or "-",
                    d.layout,
                    d.writer,
                    "orphan" if d.orphan else d.state,
                )
                for d in found
            ],
            ["name", "netns", "attached", "pins", "layout", "writer", "state"],
        ),
    )


@datapath_group.command("prune")
@pass_context
def datapath_prune(ctx: Context) -> None:
    """Remove the pins of orphans: datapaths whose network namespace is gone."""
    from pyebpflb.datapath import DEFAULT_PIN_ROOT, lifecycle

    for found in lifecycle.prune(ctx.pin_root or DEFAULT_PIN_ROOT):
        click.echo(f"orphan {found.name}: {len(found.pins)} pins removed from {found.pin_dir}")


@main_group.command()
@click.argument("iface")
@pass_context
def attach(ctx: Context, iface: str) -> None:
    """Attach the datapath to IFACE (made if it does not exist yet); idempotent."""
    with ctx.datapath(create=True) as dp:
        dp.attach(iface)
        click.echo(f"datapath {dp.name} attached to {iface}")


@main_group.command("attach-cgroup")
@click.argument("cgroup", default="/")
@click.option(
    "--connected-udp-only",
    is_flag=True,
    help="translate UDP at connect() only, not every sendmsg() (Cilium's cheaper mode)",
)
@pass_context
def attach_cgroup(ctx: Context, cgroup: str, connected_udp_only: bool) -> None:
    """Balance at the socket for the processes of CGROUP ("/": all; a cgroup v2
    directory or a name as /proc/<pid>/cgroup shows it) in the datapath's network
    namespace: local processes reach services at connect(); idempotent."""
    with ctx.datapath(create=True) as dp:
        programs = dp.attach_cgroup(cgroup, unconnected_udp=not connected_udp_only)
        click.echo(f"datapath {dp.name} balances sockets of cgroup {cgroup}: {', '.join(programs)}")


@main_group.command("detach-cgroup")
@click.argument("cgroup", default="/")
@pass_context
def detach_cgroup(ctx: Context, cgroup: str) -> None:
    """Stop balancing at the socket for CGROUP."""
    with ctx.datapath(writes=True) as dp:
        dp.detach_cgroup(cgroup)
        left = dp.cgroups
    click.echo(
        f"datapath {dp.name} detached from cgroup {cgroup}"
        + (f"; still on {', '.join(left)}" if left else "")
    )


@main_group.command()
@click.argument("iface")
@pass_context
def detach(ctx: Context, iface: str) -> None:
    """Detach the datapath from IFACE; its state stays (pinned)."""
    with ctx.datapath(writes=True) as dp:
        dp.detach(iface)
        left = dp.interfaces
    click.echo(
        f"datapath {dp.name} detached from {iface}; "
        + (f"still on {', '.join(left)}" if left else "attached nowhere now, its state is pinned")
    )


@main_group.command()
@pass_context
def destroy(ctx: Context) -> None:
    """Detach the datapath everywhere and remove its pins and maps (also one that is
    incomplete or of another pyebpflb version: nothing is loaded)."""
    from pyebpflb.datapath import DEFAULT_PIN_ROOT, lifecycle
    from pyebpflb.errors import PyEbpfLbError

    try:
        gone = lifecycle.destroy(ctx.name, ctx.pin_root or DEFAULT_PIN_ROOT, ctx.netns)
    except (PyEbpfLbError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    where = ", ".join(gone.interfaces) or "no interface"
    if gone.cgroups:
        where += " and cgroup " + ", ".join(gone.cgroups)
    click.echo(f"datapath {ctx.name} destroyed: detached from {where}, {len(gone.pins)} pins gone")
