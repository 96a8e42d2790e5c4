"""How the package is laid: what importing it pulls in, and the pure tests as any user."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PURE = ["test_alias.py", "test_k8s.py", "test_layout.py", "test_maglev.py", "test_model.py",
        "test_packing.py", "test_plan.py", "test_policy_model.py"]  # fmt: skip


def test_a_datapath_imports_neither_click_nor_yaml_nor_prometheus() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import pyebpflb; pyebpflb.Datapath"],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines()}
    assert {"pyebpflb", "_cffi_backend", "attrs"} <= imported
    assert not imported & {"click", "yaml", "prometheus_client", "pandas", "pyroute2"}


@pytest.mark.kernel  # not the kernel, but root: it drops to nobody
def test_pure_tests_pass_as_an_unprivileged_user() -> None:
    home = tempfile.mkdtemp(prefix="pyebpflb-nobody-")
    try:
        os.chown(home, 65534, 65534)
        run = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
             str(ROOT / ".venv" / "bin" / "pytest"), "-m", "not kernel", "-q", "-p",
             "no:cacheprovider", "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
             *(str(ROOT / "tests" / name) for name in PURE)],
            cwd=home,
            env={"PATH": "/usr/bin:/bin", "HOME": home},
            capture_output=True,
            text=True,
            timeout=600,
        )  # fmt: skip
    finally:
        shutil.rmtree(home, ignore_errors=True)
    last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert re.fullmatch(r"\d+ passed(, \d+ deselected)? in [\d.]+s( \(.*\))?", last), last
