"""What every attachment has in common: it detaches, once, on close or on leaving a block."""

from __future__ import annotations

from typing import Self


class Link:
    """Base of :class:`TcLink`, :class:`XdpLink` and :class:`CgroupLink`."""

    attached: bool

    def detach(self) -> None:
        """Remove the attachment; a second call does nothing."""
        raise NotImplementedError

    def close(self) -> None:
        self.detach()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
