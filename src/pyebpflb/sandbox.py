"""The sandbox's old home: :mod:`pyebpflb.testing.sandbox` is where it lives now."""

from pyebpflb.testing.sandbox import *  # noqa: F403
from pyebpflb.testing.sandbox import __all__  # noqa: F401
