"""cgroup attachment through BPF links.

A link lives as long as its fd: closing it (or the process exiting) detaches
the program, so nothing is left on the cgroup by a crashed process.
"""

from __future__ import annotations

import os

from pyebpflb._bpf._call import check_ptr
from pyebpflb._bpf._libbpf import lib
from pyebpflb._bpf.link import Link
from pyebpflb._bpf.program import Program


class CgroupLink(Link):
    """A program attached to a cgroup (v2) directory."""

    def __init__(self, link: object, path: str, program: Program) -> None:
        self._link = link
        self.attached = True
        self.path = path
        self.program = program

    @classmethod
    def attach(cls, program: Program, cgroup: str | os.PathLike[str]) -> CgroupLink:
        path = os.fspath(cgroup)
        if program._handle is None:
            raise ValueError(f"program {program.name} does not come from a loaded Object")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise ValueError(f"no cgroup directory at {path!r}") from None
        try:
            link = check_ptr(
                lib.bpf_program__attach_cgroup(program._handle, fd),
                f"attach {program.name} to cgroup {path}",
            )
        finally:
            os.close(fd)
        return cls(link, path, program)

    def detach(self) -> None:
        if self._link is not None:
            lib.bpf_link__destroy(self._link)
            self._link = None
            self.attached = False

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<CgroupLink {self.program.name} on {self.path} {state}>"


__all__ = ["CgroupLink"]
