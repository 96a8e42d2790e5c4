"""Jupyter glue: a datapath as an HTML table, flow events as a pandas DataFrame."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from pyebpflb import _html
from pyebpflb.datapath.hooks import Filter
from pyebpflb.events import FlowEvent
from pyebpflb.model import Direction, Service, endpoint_text


def datapath_html(name: str, services: list[Service] | None, hooks: list[Filter]) -> str:
    """``services`` None: the datapath is closed."""
    if services is None:
        return _html.table([], [], f"datapath {name!r} (closed)")
    rows = [
        (
            s.name,
            f"{endpoint_text(s.vip, s.port)}/{s.protocol.value}",
            s.scheduler.value,
            ", ".join(str(b) for b in s.backends) or "(none)",
        )
        for s in services
    ]
    where = ", ".join(h.iface for h in hooks if h.direction is Direction.INGRESS)
    caption = f"datapath {name!r} on {where or 'no interface'}"
    return _html.table(["service", "frontend", "scheduler", "backends"], rows, caption)


def flows_dataframe(events: Iterable[FlowEvent]) -> Any:
    """Flow events as a pandas DataFrame, one row each (Hubble's fields as columns)."""
    try:
        import pandas
    except ImportError:
        raise ImportError(
            "flows_dataframe needs pandas (pip install pandas); "
            "Datapath.monitor() gives the same events without it"
        ) from None
    columns = [field.name for field in attrs.fields(FlowEvent)]
    frame = pandas.DataFrame([e.to_dict() for e in events], columns=columns)
    frame["time"] = pandas.to_datetime(frame["time"])
    return frame
