"""python -m edge_agent: same as the tokenline-edge command."""

import sys

from edge_agent.cli import main

sys.exit(main())
