"""The wheel ships the compiled objects and works without a compiler."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest
from namespaces import VethPair

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

ROOT = pathlib.Path(__file__).resolve().parents[1]

USE_WITHOUT_COMPILER = textwrap.dedent(
    """
    import shutil, sys
    assert shutil.which("clang") is None and shutil.which("cc") is None, "a compiler is on PATH"
    import pyebpflb
    from pyebpflb import objects
    from pyebpflb._bpf import TcLink, netns, tc
    with objects.open_object("counter").load() as obj, netns.entered(sys.argv[1]):
        prog = obj.program("count_tc_ingress")
        with TcLink.attach(prog, sys.argv[2], "ingress"):
            attached = tc.query(sys.argv[2], "ingress") == prog.id
        print(pyebpflb.__file__)
        print(attached, tc.query(sys.argv[2], "ingress"))
    """
)


@pytest.mark.slow
def test_wheel_contains_the_bpf_objects_and_attaches_them_from_a_fresh_venv(
    tmp_path: pathlib.Path, veth: VethPair
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
        [venv / "bin" / "python", "-c", USE_WITHOUT_COMPILER, veth.left.netns, veth.left.iface],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": str(tmp_path / "empty")},
    )
    assert out.returncode == 0, out.stderr
    installed_at, attached = out.stdout.splitlines()
    assert installed_at.startswith(str(venv))  # not the source tree
    assert attached == "True None"  # attached while the link was open, gone after
