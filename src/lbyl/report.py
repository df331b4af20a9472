"""What a restoration did: per-layer rows, skipped layers, totals."""
from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class LayerRecord:
    name: str
    channels_before: int
    channels_after: int
    method: str
    criterion: str
    ratio: float
    re: float  # residual error, summed over pruned channels
    be: float  # BN (bias) error
    ae: float  # activation-error proxy |s|^2
    seconds: float
    consumers: list[str] = field(default_factory=list)
    bn: str | None = None
    activation: str = "relu"
    kept: list[int] = field(default_factory=list)  # original indices of the kept channels
    lambda2: float = 0.0  # the coefficient penalty this layer used (chosen per layer with "auto")
    solve: str = ""  # lbyl only: where the error was measured ("white", "bn" or "after-relu")
    condition: float | None = None  # lbyl only: condition number of the normal matrix it solved


@dataclass
class SkippedRecord:
    name: str
    reason: str


@dataclass
class Report:
    settings: dict
    layers: list[LayerRecord]
    skipped: list[SkippedRecord]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    seconds: float
    timings: dict = field(default_factory=dict)
    input_shapes: list = field(default_factory=list)  # shapes of the example inputs restore traced with

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        data = dict(data)
        data["layers"] = [LayerRecord(**row) for row in data["layers"]]
        data["skipped"] = [SkippedRecord(**row) for row in data["skipped"]]
        return cls(**data)

    def table(self) -> str:
        header = ("layer", "channels", "method", "RE", "BE", "AE", "cond", "seconds")
        rows = [
            (
                r.name,
                f"{r.channels_before} -> {r.channels_after}",
                r.method + (" (after ReLU)" if r.solve == "after-relu" else ""),
                f"{r.re:.4g}",
                f"{r.be:.4g}",
                f"{r.ae:.4g}",
                f"{r.condition:.3g}" if r.condition is not None else "-",
                f"{r.seconds:.3f}",
            )
            for r in self.layers
        ]
        out = [format_table(header, rows)]
        if self.skipped:
            out.append("")
            out.append(f"skipped ({len(self.skipped)}):")
            out.extend(f"  {s.name}: {s.reason}" for s in self.skipped)
        out.append("")
        out.append(
            f"parameters {self.params_before:,} -> {self.params_after:,} "
            f"({percent(self.params_after, self.params_before)}), "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} "
            f"({percent(self.macs_after, self.macs_before)}), {self.seconds:.2f} s"
        )
        for what, after, before in (("macs", self.macs_after, self.macs_before), ("params", self.params_after, self.params_before)):
            target = self.settings.get(f"target_{what}")
            if target is not None:
                out.append(f"target {what} <= {100 * target:.1f}%: reached {percent(after, before)}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


_REPORTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def attach_report(model, report: "Report") -> None:
    """Remember the report of a restored model (for :func:`lbyl.save_restored`); no attribute is set on it."""
    _REPORTS[model] = report


def report_of(model) -> "Report | None":
    return _REPORTS.get(model)


def format_table(header, rows) -> str:
    """Left-aligned columns, a rule under the header."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line("-" * w for w in widths), *map(line, rows)])


def percent(after: int, before: int) -> str:
    return f"{100.0 * after / before:.1f}%" if before else "n/a"
