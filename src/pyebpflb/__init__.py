"""pyebpflb: Kubernetes-style service load balancing in the Linux kernel with eBPF, as a library.

::

    import pyebpflb as lb

    web = lb.Service(vip="10.96.0.10", port=80, protocol="tcp", name="default/my-app",
                     backends=[lb.Backend("10.0.1.1", 8080), lb.Backend("10.0.1.2", 8080)])
    with lb.Datapath("demo") as dp:
        dp.attach("eth0")
        dp.sync([web])

The model (:class:`Service`, :class:`Backend`, :class:`Policy`, :class:`Rule`) and
the errors import anywhere,
without root and without a kernel; the kernel-facing names (:class:`Datapath`,
:class:`Sandbox`, :class:`InterfaceCounter`) load the libbpf binding on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pyebpflb.errors import (
    BpfError,
    Busy,
    DatapathClosed,
    IncompatibleDatapath,
    LoadError,
    MapFull,
    MissingPrivilege,
    NotFound,
    NotSupported,
    PyEbpfLbError,
    VerifierError,
)
from pyebpflb.model import (
    Action,
    Backend,
    BackendState,
    Direction,
    Forwarding,
    Frontend,
    Node,
    Policy,
    Protocol,
    Rule,
    RuleProtocol,
    Scheduler,
    Service,
    TrafficPolicy,
    Verdict,
)

if TYPE_CHECKING:
    from pyebpflb.counter import Count, InterfaceCounter
    from pyebpflb.datapath import (
        Attachment,
        ConntrackTable,
        ConntrackTimeouts,
        Datapath,
        DatapathStats,
        Explanation,
        ServiceStats,
        Traffic,
    )
    from pyebpflb.events import EventStats, FlowEvent
    from pyebpflb.health import HealthServer
    from pyebpflb.testing.sandbox import Sandbox

__version__ = "0.2.0"

_LAZY = {
    "Count": "pyebpflb.counter",
    "InterfaceCounter": "pyebpflb.counter",
    "Attachment": "pyebpflb.datapath",
    "ConntrackTable": "pyebpflb.datapath",
    "ConntrackTimeouts": "pyebpflb.datapath",
    "Datapath": "pyebpflb.datapath",
    "DatapathStats": "pyebpflb.datapath",
    "Explanation": "pyebpflb.datapath",
    "EventStats": "pyebpflb.events",
    "FlowEvent": "pyebpflb.events",
    "HealthServer": "pyebpflb.health",
    "ServiceStats": "pyebpflb.datapath",
    "Traffic": "pyebpflb.datapath",
    "Sandbox": "pyebpflb.testing.sandbox",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyebpflb' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "Action",
    "Attachment",
    "Backend",
    "BackendState",
    "BpfError",
    "Busy",
    "ConntrackTable",
    "ConntrackTimeouts",
    "Count",
    "Datapath",
    "DatapathClosed",
    "DatapathStats",
    "Direction",
    "EventStats",
    "Explanation",
    "FlowEvent",
    "Forwarding",
    "Frontend",
    "HealthServer",
    "IncompatibleDatapath",
    "InterfaceCounter",
    "LoadError",
    "MapFull",
    "MissingPrivilege",
    "Node",
    "NotFound",
    "NotSupported",
    "Policy",
    "Protocol",
    "PyEbpfLbError",
    "Rule",
    "RuleProtocol",
    "Sandbox",
    "Scheduler",
    "Service",
    "ServiceStats",
    "Traffic",
    "TrafficPolicy",
    "Verdict",
    "VerifierError",
    "__version__",
]
