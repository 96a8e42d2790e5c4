"""The ``pyebpflb`` command: look at and drive a persisted datapath by name.

Human tables by default, ``-o json`` for scripts. Every command but ``demo``
and ``apply`` needs the datapath to exist (``--datapath``, default
"default"; ``--netns`` to reach one in another network namespace).
"""

from pyebpflb.cli import actions, state  # noqa: F401  (they add their commands)
from pyebpflb.cli.base import main, main_group

__all__ = ["main", "main_group"]
