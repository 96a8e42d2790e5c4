"""pyebpflb and Kubernetes: Services and EndpointSlices as kube-proxy reads them.

- :func:`translate` / :func:`services` / :func:`load`: manifests (``kubectl get -o
  yaml``) to pyebpflb services, with kube-proxy's semantics (pure Python).
- :class:`ServiceProxy`: the caches, the initial-sync gate and the debounced,
  incremental programming of a datapath from watch events, for a controller that
  has its own watches (kopf, controller-runtime ports, a script).
- :func:`network_policies`: NetworkPolicies (with Pods and Namespaces) to policies with
  subjects, Kubernetes' semantics (pure Python; the datapath enforces them).
- :func:`run` (:func:`arun` for asyncio) / :class:`Watcher`: the list-and-watch loop
  itself on the official ``kubernetes`` client (``pip install 'pyebpflb[kubernetes]'``),
  as ``pyebpflb agent`` runs it.
"""

from pyebpflb.k8s.netpol import NetworkPolicyTranslator, PolicyTranslation, network_policies
from pyebpflb.k8s.proxy import EVENTS, ServiceProxy
from pyebpflb.k8s.translate import (
    IGNORED_LABELS,
    ZONE_LABEL,
    ManifestError,
    Translation,
    load,
    services,
    translate,
)
from pyebpflb.k8s.watch import Watcher, arun, run

__all__ = [
    "EVENTS",
    "IGNORED_LABELS",
    "ZONE_LABEL",
    "ManifestError",
    "NetworkPolicyTranslator",
    "PolicyTranslation",
    "ServiceProxy",
    "Translation",
    "Watcher",
    "arun",
    "load",
    "network_policies",
    "run",
    "services",
    "translate",
]
