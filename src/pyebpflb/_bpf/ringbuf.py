"""BPF ring buffer consumer with a Python callback."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pyebpflb._bpf._call import check, check_ptr
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb._bpf.map import Map, MapType
from pyebpflb.errors import DatapathClosed


@ffi.def_extern()  # type: ignore[untyped-decorator]
def pyebpflb_on_ringbuf_sample(ctx: Any, data: Any, size: int) -> int:
    ring: RingBuffer = ffi.from_handle(ctx)
    return ring._deliver(data, size)


class RingBuffer:
    """Delivers each record of a ring buffer map to ``callback``.

    With ``event_type`` (a C type from ``csrc/include``) the callback gets a
    cffi struct copy, otherwise ``bytes``. A callback that returns ``False``
    stops the current poll; an exception in it is raised from :meth:`poll`.
    """

    def __init__(
        self,
        ring_map: Map,
        callback: Callable[[Any], object],
        *,
        event_type: str | None = None,
    ) -> None:
        if ring_map.type != MapType.RINGBUF:
            raise ValueError(f"map {ring_map.name} is not a ring buffer (type {ring_map.type})")
        self.map = ring_map
        self.callback = callback
        self.event_type = event_type
        self._event_size = ffi.sizeof(event_type) if event_type else 0
        self._error: BaseException | None = None
        self._self_handle = ffi.new_handle(self)
        self._ring: Any = check_ptr(
            lib.ring_buffer__new(
                ring_map.fd, lib.pyebpflb_on_ringbuf_sample, self._self_handle, ffi.NULL
            ),
            f"open ring buffer {ring_map.name}",
        )

    def _deliver(self, data: Any, size: int) -> int:
        try:
            if self.event_type:
                if size < self._event_size:
                    raise ValueError(
                        f"ring buffer record of {size} bytes is shorter than {self.event_type}"
                    )
                event: Any = ffi.new(f"{self.event_type} *")
                ffi.memmove(event, data, self._event_size)
            else:
                event = bytes(ffi.buffer(data, size))
            return -1 if self.callback(event) is False else 0
        except BaseException as exc:  # delivered to poll()'s caller
            self._error = exc
            return -1

    def poll(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds (``None``: forever) and deliver what came.

        Returns the number of records delivered.
        """
        ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
        ret = lib.ring_buffer__poll(self._live(), ms)
        return self._result(ret, "poll")

    def consume(self) -> int:
        """Deliver what is there now, without waiting."""
        return self._result(lib.ring_buffer__consume(self._live()), "consume")

    def fileno(self) -> int:
        """An epoll fd that becomes readable when records arrive (for event loops)."""
        return int(lib.ring_buffer__epoll_fd(self._live()))

    def _result(self, ret: int, what: str) -> int:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return check(ret, f"{what} ring buffer {self.map.name}")

    def _live(self) -> Any:
        if self._ring is None:
            raise DatapathClosed(f"ring buffer {self.map.name} is closed")
        return self._ring

    def close(self) -> None:
        if self._ring is not None:
            lib.ring_buffer__free(self._ring)
            self._ring = None

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
