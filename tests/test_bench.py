"""The benchmark harness at tiny N, so it cannot rot. Nothing here is about speed."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_smoke_run_writes_a_report_and_cleans_up(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "performance.md"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = out.read_text()
    for section in (
        "## Targets",
        "## New-connection latency",
        "## Request rate",
        "## Programming time",
        "## Per-packet kernel cost",
        "## Kernel memory",
    ):
        assert section in report
    for contender in ("no LB (floor)", "kube-proxy iptables", "kube-proxy nftables", "pyebpflb"):
        assert f"| 10 | {contender} |" in report
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pyebpflb-bench" not in namespaces
