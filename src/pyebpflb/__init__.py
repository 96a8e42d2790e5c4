"""pyebpflb: Kubernetes-style service load balancing and L3/L4 policy in the
Linux kernel with eBPF, as a library.

The load balancer itself arrives with the service datapath; this release ships
the foundation: the libbpf binding (:mod:`pyebpflb._bpf`), the shipped BPF
objects (:mod:`pyebpflb.objects`), the error hierarchy (:mod:`pyebpflb.errors`)
and a first program, :class:`~pyebpflb.counter.InterfaceCounter`.
"""

from pyebpflb.counter import Count, InterfaceCounter
from pyebpflb.errors import (
    BpfError,
    LoadError,
    MapFull,
    MissingPrivilege,
    NotFound,
    NotSupported,
    PyEbpfLbError,
    VerifierError,
)

__version__ = "0.1.0"

__all__ = [
    "BpfError",
    "Count",
    "InterfaceCounter",
    "LoadError",
    "MapFull",
    "MissingPrivilege",
    "NotFound",
    "NotSupported",
    "PyEbpfLbError",
    "VerifierError",
    "__version__",
]
