"""The ``pyebpflb`` command: look at and drive a persisted datapath by name.

Human tables by default, ``-o json`` for scripts. Every command but ``demo``,
``apply``, ``attach`` and ``datapath list`` needs the datapath to exist
(``--datapath`` or ``$PYEBPFLB_DATAPATH``, default "default"; ``--netns`` or
``$PYEBPFLB_NETNS`` to reach one in another network namespace).
"""

from pyebpflb.cli import actions, agent, lifecycle, state  # noqa: F401  (they add their commands)
from pyebpflb.cli.base import main, main_group

__all__ = ["main", "main_group"]
