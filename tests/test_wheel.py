"""The wheel ships the compiled objects and works without a compiler."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

USE_WITHOUT_COMPILER = textwrap.dedent(
    """
    import shutil
    assert shutil.which("clang") is None and shutil.which("cc") is None, "a compiler is on PATH"
    import pyebpflb
    from pyebpflb import objects
    with objects.open_object("counter").load() as obj:
        print(pyebpflb.__file__)
        print(sorted(obj.programs))
    """
)


@pytest.mark.slow
def test_wheel_contains_the_bpf_objects_and_loads_them_in_a_fresh_venv(
    tmp_path: pathlib.Path,
) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = wheels.glob("pyebpflb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pyebpflb/bpf/counter.bpf.o" in names
    assert any(n.startswith("pyebpflb/_bpf/_libbpf") and n.endswith(".so") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", str(wheel)], check=True)
    out = subprocess.run(
        [venv / "bin" / "python", "-c", USE_WITHOUT_COMPILER],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": str(tmp_path / "empty")},
    )
    assert out.returncode == 0, out.stderr
    installed_at, programs = out.stdout.splitlines()
    assert installed_at.startswith(str(venv))  # not the source tree
    assert "count_tc_ingress" in programs
