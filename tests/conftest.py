import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# the experiments in benchmarks/ are not installed: import them from the repository root
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
