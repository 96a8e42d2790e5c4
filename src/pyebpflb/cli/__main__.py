import sys

from pyebpflb.cli import main

sys.exit(main())
