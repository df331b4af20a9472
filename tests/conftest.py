import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
# the experiments in benchmarks/ are not installed: import them from the repository root
sys.path.insert(1, str(REPO))
# the one configurable assets root: $LBYL_ASSETS, else ../shared/assets beside this checkout
os.environ.setdefault("LBYL_ASSETS", str((REPO / ".." / "shared" / "assets").resolve()))
