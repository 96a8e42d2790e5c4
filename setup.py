"""Build: BPF objects with clang into package data, and the cffi libbpf binding.

Every ``csrc/bpf/*.bpf.c`` is compiled with ``clang -O2 -g -target bpf`` into
``pyebpflb/bpf/*.bpf.o`` of the build (and of ``src/`` for editable installs),
so wheels ship the objects and users need no compiler.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent
BPF_SOURCES = sorted((ROOT / "csrc" / "bpf").glob("*.bpf.c"))
BPF_HEADERS = sorted((ROOT / "csrc").rglob("*.h"))


def _multiarch_include() -> list[str]:
    """asm/types.h lives in the multiarch folder, which -target bpf does not search."""
    for cmd in (["gcc", "-print-multiarch"], ["dpkg-architecture", "-qDEB_HOST_MULTIARCH"]):
        if shutil.which(cmd[0]):
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
            if out and os.path.isdir(f"/usr/include/{out}"):
                return [f"-I/usr/include/{out}"]
    return []


def compile_bpf(out_dir: pathlib.Path) -> None:
    clang = os.environ.get("BPF_CLANG", "clang")
    if shutil.which(clang) is None:
        raise SystemExit(f"building pyebpflb needs {clang!r} (Debian: apt-get install clang llvm)")
    out_dir.mkdir(parents=True, exist_ok=True)
    newest_header = max((h.stat().st_mtime for h in BPF_HEADERS), default=0.0)
    for source in BPF_SOURCES:
        target = out_dir / source.name.replace(".bpf.c", ".bpf.o")
        if target.exists() and target.stat().st_mtime > max(source.stat().st_mtime, newest_header):
            continue
        cmd = [
            clang, "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
            "-I", str(ROOT / "csrc" / "include"), "-I", str(ROOT / "csrc" / "bpf"),
            *_multiarch_include(),
            "-c", str(source), "-o", str(target),
        ]
        print(" ".join(cmd))
        if subprocess.run(cmd, check=False).returncode != 0:
            # SystemExit, not an Exception: setuptools' editable install swallows
            # those from build_py, and `make build` would succeed without the object.
            raise SystemExit(f"compiling {source.name} failed (the compiler's message is above)")


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            compile_bpf(ROOT / "src" / "pyebpflb" / "bpf")
        else:
            compile_bpf(pathlib.Path(self.build_lib) / "pyebpflb" / "bpf")


setup(
    cmdclass={"build_py": BuildPyWithBpf},
    cffi_modules=["csrc/libbpf_binding.py:ffibuilder"],
)
