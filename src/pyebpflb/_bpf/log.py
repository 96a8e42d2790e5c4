"""libbpf's messages, routed to ``logging.getLogger("pyebpflb")``.

libbpf prints to stderr unless told otherwise; the binding installs a print
callback once at import so nothing reaches stderr directly. While a load is in
progress, :func:`capture` also collects the messages, so a verifier rejection
can carry the log in the exception.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from pyebpflb._bpf._libbpf import ffi, lib

logger = logging.getLogger("pyebpflb")
# A library leaves output to the application: without a configured handler,
# messages are dropped instead of going to stderr through logging's last resort.
logger.addHandler(logging.NullHandler())

_LEVELS = {
    lib.LIBBPF_WARN: logging.WARNING,
    lib.LIBBPF_INFO: logging.INFO,
    lib.LIBBPF_DEBUG: logging.DEBUG,
}
_captures = threading.local()


@ffi.def_extern()  # type: ignore[untyped-decorator]
def pyebpflb_on_libbpf_log(level: int, line: object) -> None:
    text = ffi.string(line).decode("utf-8", "replace")
    stack = getattr(_captures, "stack", ())
    for sink in stack:
        sink.append(text)
    if stack and getattr(_captures, "silent", 0):
        return
    py_level = _LEVELS.get(level, logging.DEBUG)
    if logger.isEnabledFor(py_level):
        logger.log(py_level, "libbpf: %s", text.rstrip("\n"))


@contextlib.contextmanager
def capture(*, silent: bool = False) -> Iterator[list[str]]:
    """Collect libbpf's messages of the current thread while the block runs.

    ``silent`` keeps them out of the log: for calls whose failure is expected
    and handled (libbpf reports the kernel's "already exists" as a warning).
    """
    stack: list[list[str]] = getattr(_captures, "stack", [])
    _captures.stack = stack
    lines: list[str] = []
    stack.append(lines)
    _captures.silent = getattr(_captures, "silent", 0) + int(silent)
    try:
        yield lines
    finally:
        stack.remove(lines)
        _captures.silent -= int(silent)


lib.pyebpflb_install_libbpf_log()
