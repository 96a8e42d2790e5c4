"""What every ``pyebpflb`` command shares: the group and its options, the datapath
it opens, and output as tables or JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from pyebpflb.datapath import Datapath

OUTPUT = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True
)


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    cells = [[str(h).upper() for h in header]] + [
        ["-" if c is None else str(c) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def emit(
    output: str, data: Any, rows: Callable[[], tuple[list[Sequence[object]], list[str]]]
) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        body, header = rows()
        click.echo(table(body, header))


class Context:
    def __init__(self, name: str, netns: str | None, pin_root: str | None) -> None:
        self.name = name
        self.netns = netns
        self.pin_root = pin_root

    @contextmanager
    def datapath(self, *, create: bool = False, writes: bool = False) -> Iterator[Datapath]:
        """The named datapath, kept running when the command ends. A command that only
        reads (``writes`` False) makes no pins: a look leaves no trace."""
        from pyebpflb.datapath import DEFAULT_PIN_ROOT, Datapath
        from pyebpflb.errors import PyEbpfLbError

        try:
            dp = Datapath(
                self.name,
                persist=True,
                create=create,
                pin=create or writes,
                netns=self.netns,
                pin_root=self.pin_root or DEFAULT_PIN_ROOT,
            )
        except (PyEbpfLbError, PermissionError, ValueError) as exc:  # NotFound among them
            raise click.ClickException(str(exc)) from None
        try:
            yield dp
        except (ValueError, PyEbpfLbError) as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            dp.close()


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--datapath",
    "name",
    default="default",
    show_default=True,
    envvar="PYEBPFLB_DATAPATH",
    show_envvar=True,
    help="datapath name",
)
@click.option(
    "--netns",
    default=None,
    envvar="PYEBPFLB_NETNS",
    show_envvar=True,
    help="network namespace of the datapath (ip netns name)",
)
@click.option("--pin-root", default=None, help="bpffs folder of the pins [/sys/fs/bpf/pyebpflb]")
@click.pass_context
def main_group(ctx: click.Context, name: str, netns: str | None, pin_root: str | None) -> None:
    """Kubernetes-style service load balancing and policy in the kernel with eBPF."""
    ctx.obj = Context(name, netns, pin_root)


def service_dict(svc: Any) -> dict[str, Any]:
    return {
        "name": svc.name,
        "vip": str(svc.vip),
        "port": svc.port,
        "protocol": svc.protocol.value,
        "kind": svc.kind.value,
        "scheduler": svc.scheduler.value,
        "affinity_timeout": svc.affinity_timeout,
        "external_traffic_policy": svc.external_traffic_policy.value,
        "source_ranges": [str(n) for n in svc.source_ranges],
        "health_check_node_port": svc.health_check_node_port,
        "forwarding": svc.forwarding.value,
        "backends": [
            {
                "address": str(b.address),
                "port": b.port,
                "weight": b.weight,
                "state": b.state.value,
            }
            for b in svc.backends
        ],
    }


def main(argv: list[str] | None = None) -> int:
    try:
        main_group.main(args=argv, prog_name="pyebpflb", standalone_mode=False)
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except SystemExit as done:
        return int(done.code or 0)
    return 0
