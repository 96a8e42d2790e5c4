"""The load balancer in the kernel: load or adopt it, attach it, program it
(services and policies), watch it (flow events, counters, explain).

:class:`Datapath` is composed of parts with one job each:

- ``limits``: the constructor's sizes, and which argument sizes which map;
- ``adopt``: finding a datapath's maps (attached programs, pins), checking that
  they fit this version, loading the programs over them, ``lb_config``;
- ``migrate``: how each layout version migrates from the one before (upgrades
  in place);
- ``lock``: the writer lock and the one-reader lock of flow events;
- ``repair``: finishing a change whose writer died;
- ``lifecycle``: every datapath on the host, and a teardown that loads nothing;
- ``hooks``: attaching, detaching and finding its tc filters;
- ``state``: reading services and policies back, the change counter;
- ``apply``: planning (``pyebpflb.plan``) and executing changes, with undo;
- ``inspect``: counters, maps and conntrack entries, as typed results;
- ``explain``: a dry run of the programs on a probe packet;
- ``notebook``: HTML tables and DataFrames for Jupyter.
"""

from pyebpflb.datapath.core import DEFAULT_PIN_ROOT, NAME_MAX, Datapath
from pyebpflb.datapath.limits import Limits
from pyebpflb.datapath.migrate import LAYOUT_VERSION
from pyebpflb.datapath.results import (
    Attachment,
    ConntrackTable,
    ConntrackTimeouts,
    DatapathStats,
    Explanation,
    Flow,
    Hook,
    MapInfo,
    ServiceStats,
    Traffic,
)

__all__ = [
    "DEFAULT_PIN_ROOT",
    "LAYOUT_VERSION",
    "NAME_MAX",
    "Attachment",
    "ConntrackTable",
    "ConntrackTimeouts",
    "Datapath",
    "DatapathStats",
    "Explanation",
    "Flow",
    "Hook",
    "Limits",
    "MapInfo",
    "ServiceStats",
    "Traffic",
]
