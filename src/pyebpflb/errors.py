"""The one exception hierarchy of pyebpflb.

Every error the library raises on purpose derives from :class:`PyEbpfLbError`.
Errors that come from the kernel also derive from :class:`OSError` (through
:class:`BpfError`) and carry ``errno``, so callers may catch either.
"""

from __future__ import annotations

import errno as errno_mod
import os

PRIVILEGE_HINT = "needs CAP_BPF and CAP_NET_ADMIN (CAP_SYS_ADMIN on older kernels): run as root"


class PyEbpfLbError(Exception):
    """Base class of every error raised by pyebpflb."""


class DatapathClosed(PyEbpfLbError):
    """The datapath, object, map or ring buffer was closed: open it again to go on."""


class IncompatibleDatapath(PyEbpfLbError):
    """A datapath found (pinned, or attached here) has maps this version cannot use;
    ``differences`` lists each, in words. Nothing was changed."""

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(f"{message}: " + "; ".join(differences))
        self.differences = differences


class Busy(PyEbpfLbError):
    """Another process holds what this call needs alone (the reader of a datapath's
    events); the message names it. Nothing was changed."""

    def __init__(self, message: str, holder: int | None) -> None:
        super().__init__(message)
        self.holder = holder


class BpfError(PyEbpfLbError, OSError):
    """The kernel or libbpf refused an operation.

    ``errno`` holds the error number, ``operation`` says what was attempted.
    """

    def __init__(self, err: int, operation: str, detail: str = "") -> None:
        message = f"{operation}: {os.strerror(err)} (errno {err})"
        if detail:
            message = f"{message}; {detail}"
        OSError.__init__(self, err, message)
        self.operation = operation

    def __str__(self) -> str:
        return str(self.strerror)


class MissingPrivilege(BpfError, PermissionError):
    """The caller lacks the capabilities the operation needs."""

    def __init__(self, err: int, operation: str) -> None:
        super().__init__(err, operation, PRIVILEGE_HINT)


class LoadError(BpfError):
    """Loading a BPF object failed (a map could not be created or reused, ...).

    ``log`` holds everything libbpf and the kernel said during the load.
    """

    def __init__(self, err: int, operation: str, log: str) -> None:
        tail = "\n".join(log.strip().splitlines()[-20:])
        super().__init__(err, operation, f"libbpf/verifier log (last lines):\n{tail}")
        self.log = log


class VerifierError(LoadError):
    """The kernel verifier rejected a program; ``log`` holds the verifier's log."""


class NotFound(BpfError, FileNotFoundError):
    """What the operation names does not exist (ENOENT): a pin path, a map key, an id."""


class MapFull(BpfError):
    """A map has no room for another entry (E2BIG/ENOSPC from the kernel)."""


class NotSupported(PyEbpfLbError):
    """The running kernel or libbpf lacks a feature the operation needs."""


def from_errno(err: int, operation: str) -> BpfError:
    """The most specific exception for a kernel error number."""
    if err == errno_mod.EPERM:
        return MissingPrivilege(err, operation)
    if err == errno_mod.ENOENT:
        return NotFound(err, operation)
    if err in (errno_mod.E2BIG, errno_mod.ENOSPC):
        return MapFull(err, operation)
    return BpfError(err, operation)
