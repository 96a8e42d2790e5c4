"""The compiled BPF objects shipped inside the package.

``setup.py`` compiles every ``csrc/bpf/*.bpf.c`` into ``pyebpflb/bpf/``; at
run time they are read as package resources and opened from memory, so no
compiler and no source tree is needed to use the library.
"""

from __future__ import annotations

import importlib.resources
import os

from pyebpflb._bpf import OpenObject


def available() -> list[str]:
    """Names of the shipped objects (``counter`` for ``counter.bpf.o``)."""
    folder = importlib.resources.files("pyebpflb") / "bpf"
    if not folder.is_dir():
        return []
    return sorted(
        p.name.removesuffix(".bpf.o") for p in folder.iterdir() if p.name.endswith(".bpf.o")
    )


def image(name: str) -> bytes:
    """The ELF bytes of the shipped object ``name``."""
    resource = importlib.resources.files("pyebpflb") / "bpf" / f"{name}.bpf.o"
    try:
        return resource.read_bytes()
    except FileNotFoundError:
        raise ValueError(
            f"no shipped BPF object {name!r}; available: {', '.join(available()) or 'none'} "
            "(a source checkout needs `make build` first)"
        ) from None


def open_object(name: str, *, pin_dir: str | os.PathLike[str] | None = None) -> OpenObject:
    """Open (not load) the shipped object ``name``; ``.load()`` it to use it."""
    return OpenObject.open(image(name), name, pin_dir=pin_dir)
