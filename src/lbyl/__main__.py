"""``python -m lbyl``: the same as the ``lbyl`` command."""
import sys

from .cli import main

sys.exit(main())
