"""The cyclic garbage collector paused around work that makes many objects that live on
(pure: planning a change, translating NetworkPolicies)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for one change. Planning 100,000 services
    makes millions of objects that live on, and each collection of the young
    generation would walk them all again: a third of a large sync's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
