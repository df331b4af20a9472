"""Storage of the CIFAR-10 benchmark: ``results.csv``, ``layers.jsonl``, the writer's lock and
the identity of the machine and code."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

COLUMNS = (
    "key", "label", "kind", "model", "weights", "ratio", "method", "criterion", "lambda1", "lambda2",
    "bias_correction", "accuracy", "params", "macs", "restore_seconds", "eval_seconds", "re", "be", "ae",
    "images", "seed", "lossless", "layer_lambda2_mean", "commit", "finished", "input_model", "variance_correction",
)  # fmt: skip
FLOATS = ("ratio", "accuracy", "restore_seconds", "eval_seconds", "re", "be", "ae", "layer_lambda2_mean")
INTS = ("params", "macs", "images", "seed")


def convert(row: dict) -> dict:
    out = dict(row)
    for k in FLOATS:
        if out.get(k) not in (None, ""):
            out[k] = float(out[k])
    for k in INTS:
        if out.get(k) not in (None, ""):
            out[k] = int(out[k])
    return out


def read_rows(path: str | os.PathLike) -> list[dict]:
    """All rows of ``results.csv`` in file order, numeric columns converted."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [convert(row) for row in csv.DictReader(f)]


def latest_by_key(rows: Iterable[dict]) -> dict[str, dict]:
    """The last row of every key (a rerun supersedes an older row)."""
    return {row["key"]: row for row in rows}


def csv_value(value):
    return repr(value) if isinstance(value, float) else value


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:  # written by another version: rewrite with the current columns
            rewrite(path, read_rows(path))
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: csv_value(row.get(k, "")) for k in COLUMNS})
        f.flush()
        os.fsync(f.fileno())


def rewrite(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: csv_value(row.get(k, "")) for k in COLUMNS})
    os.replace(tmp, path)


def read_layers(path: str | os.PathLike) -> dict[str, list[dict]]:
    """``layers.jsonl``: {run key: per-layer records} (last line of a key wins)."""
    path = Path(path)
    out = {}
    if path.is_file():
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a crash
                        continue
                    out[record["key"]] = record["layers"]
    return out


def append_layers(path: Path, key: str, records: list[dict]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(dict(key=key, layers=records)) + "\n")


def drop_methods(out: Path, methods: Sequence[str]) -> int:
    """Remove the main/oracle rows of ``methods`` (a backup of the CSV is kept); returns the count."""
    csv_path = out / "results.csv"
    rows = read_rows(csv_path)
    keep = [r for r in rows if r["kind"] == "baseline" or r["method"] not in methods]
    dropped = len(rows) - len(keep)
    if dropped:
        shutil.copyfile(csv_path, csv_path.with_suffix(".csv.bak"))
        rewrite(csv_path, keep)
        kept_keys = {r["key"] for r in keep}
        layers_path = out / "layers.jsonl"
        if layers_path.is_file():
            lines = [ln for ln in layers_path.read_text().splitlines() if ln.strip()]
            lines = [ln for ln in lines if _line_key(ln) in kept_keys]
            layers_path.write_text("".join(ln + "\n" for ln in lines))
    return dropped


def _line_key(line: str) -> str | None:
    try:
        return json.loads(line)["key"]
    except (json.JSONDecodeError, KeyError):
        return None


@contextlib.contextmanager
def lock(out: Path):
    """One writer per output folder (two would also fight for the same CPU cores)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"another benchmark is writing to {out}; wait for it or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------
# machine and code identity


def git_commit() -> str:
    """The short commit of the repository, ``+dirty`` when the library's sources have changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src/lbyl"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{commit}{'+dirty' if dirty else ''}" if commit else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    import torch

    try:
        import torch_pruning

        tp_version = getattr(torch_pruning, "__version__", "")
    except ImportError:  # pragma: no cover
        tp_version = ""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = []
    return dict(
        nproc=cores,
        cpu=_cpu_model(),
        threads=threads,
        torch=torch.__version__,
        torch_pruning=tp_version,
        python=platform.python_version(),
        platform=platform.platform(),
        loadavg_at_start=load,
        commit=git_commit(),
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
