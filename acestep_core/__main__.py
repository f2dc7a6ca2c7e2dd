"""``python -m acestep_core generate ...``: see acestep_core.cli."""
import sys

from .cli import main

sys.exit(main())
