"""Smoke configuration of the CIFAR-10 ResNet benchmark (benchmarks/cifar10_resnets.py: real
checkpoint, real test images) and its keys; docs/benchmarks.md against the tracked results."""
import os
from pathlib import Path

import pytest
import torch

import lbyl
from benchmarks import cifar10_resnets as bench
from benchmarks.cifar10_plan import fmt, paper_lambdas
from lbyl.data import assets_root


def _needed_assets():
    root = assets_root()
    paths = [root / "cifar10-jpeg" / "test_jpg.tar.gz", root / "cifar-lossless-samples"]
    paths += [root / bench.CHECKPOINTS[label].path for label in bench.SMOKE["checkpoints"]]
    return [p for p in paths if not p.exists()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    missing = _needed_assets()
    if missing:
        message = f"shared assets absent (set LBYL_ASSETS): {', '.join(map(str, missing))}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("bench") / "cifar10"
    assert bench.main(["--config", "smoke", "--out", str(out), "--no-progress"]) == 0
    return out


def test_structure(smoke):
    assert {"results.csv", "layers.jsonl", "summary.md", "machine.json", "cifar10-resnet20-jpeg.png"} <= {
        p.name for p in smoke.iterdir()
    }
    rows = bench.read_rows(smoke / "results.csv")
    assert tuple(rows[0]) == bench.COLUMNS
    ratios = bench.SMOKE["ratios"]
    assert len(rows) == 1 + len(ratios) * len(bench.METHODS)
    assert {r["method"] for r in rows} == {"unpruned", *bench.METHODS}
    assert all(r["images"] == bench.SMOKE["limit"] for r in rows)
    assert len({r["key"] for r in rows}) == len(rows)
    summary = (smoke / "summary.md").read_text()
    assert "resnet20-jpeg" in summary and "lossless samples" in summary
    assert (smoke / "cifar10-resnet20-jpeg.png").read_bytes()[:4] == b"\x89PNG"


def test_sanity(smoke):
    rows = bench.read_rows(smoke / "results.csv")
    base = next(r for r in rows if r["kind"] == "baseline")
    assert base["lossless"] == "20"  # the JPEG-adapted ResNet-20 classifies all 20 lossless samples
    assert all(0 <= r["accuracy"] <= 100 for r in rows)
    for method in bench.METHODS:
        by_ratio = sorted((r["ratio"], r) for r in rows if r["method"] == method)
        # nothing removed: the restored model is the unpruned one
        assert by_ratio[0][0] == 0 and by_ratio[0][1]["accuracy"] == base["accuracy"]
        assert by_ratio[0][1]["params"] == base["params"] and by_ratio[0][1]["macs"] == base["macs"]
        params = [base["params"], *(r["params"] for ratio, r in by_ratio if ratio > 0)]
        assert all(a > b for a, b in zip(params, params[1:])), f"{method}: parameters must shrink with the ratio"
    lbyl = next(r for r in rows if r["method"] == "lbyl-paper")
    assert (lbyl["lambda1"], lbyl["lambda2"]) == tuple(fmt(x) for x in bench.PAPER_LAMBDAS)


def test_resume_skips_finished_runs(smoke, capsys):
    before = (smoke / "results.csv").read_text()
    assert bench.main(["--config", "smoke", "--out", str(smoke), "--no-progress"]) == 0
    assert (smoke / "results.csv").read_text() == before
    assert "0 to do" in capsys.readouterr().err


def test_keys_follow_the_library_defaults():
    plan = bench.build_plan("full")
    run = next(r for r in plan if r.method == "lbyl")
    assert run.lambda1 is None and run.lambda2 is None  # the benchmark passes nothing: it follows the defaults
    assert run.method_object() == lbyl.LBYL()
    defaults = bench.method_defaults()
    assert defaults["lbyl"] == lbyl.LBYL().settings()
    a = run.key({**defaults, "lbyl": dict(defaults["lbyl"], lambda1=0.0, lambda2=0.0)})
    b = run.key({**defaults, "lbyl": dict(defaults["lbyl"], lambda1=1.0, lambda2="auto")})
    assert a != b and "l2=auto" in b
    prune = next(r for r in plan if r.method == "prune")
    assert prune.key({"prune": {"lambda2": 0.0}}) == prune.key({"prune": {"lambda2": 1.0}})
    assert len({r.key(defaults) for r in plan}) == len(plan)
    assert len([r for r in plan if r.kind == "main"]) == 5 * 7 * 5 + 3 * 7 * 5


@pytest.mark.parametrize("arch", sorted({c.arch for c in bench.CHECKPOINTS.values()}))
def test_propagated_input_model_is_white_on_the_resnets(arch):
    """The benchmark keys treat the two input models as one on these networks, and leave out the scale
    mixture (no depthwise chain here): check that both change nothing."""
    from lbyl.models import build_model

    torch.manual_seed(0)
    model = build_model(arch).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 32, 32)
    # the white, Gaussian model of 0.5.0 against the default (propagated, scale mixture in depthwise chains)
    white, _ = lbyl.restore(model, x, 0.5, lbyl.LBYL(input_model="white", scale_spread=0.0))
    propagated, report = lbyl.restore(model, x, 0.5, lbyl.LBYL())
    assert {r.solve for r in report.layers} == {"white"}
    for (name, a), b in zip(white.state_dict().items(), propagated.state_dict().values()):
        assert torch.equal(a, b), name
    assert lbyl.LBYL(input_model="bn").settings() != lbyl.LBYL().settings()


def test_runs_are_method_objects():
    plan = bench.build_plan("full", oracle=True)
    paper = next(r for r in plan if r.method == "lbyl-paper" and r.kind == "main")
    assert paper.method_object() == lbyl.paper.LBYL(*bench.PAPER_LAMBDAS)
    flipped = next(r for r in plan if r.kind == "ablation" and r.method == "nm")
    assert flipped.method_object() == lbyl.NeuronMerging(mean_correction=True)
    assert "|bc=true|" in flipped.key(bench.method_defaults())
    model = next(r for r in plan if r.kind == "input-model")
    assert model.method_object() == lbyl.LBYL(input_model="bn")
    assert next(r for r in plan if r.method == "nm-paper").method_object() == lbyl.as_method("nm-paper")
    with pytest.raises(ValueError, match="no option"):
        bench.Run("resnet20", "main", 0.5, "prune", "l2", lambda1=1.0).method_object()


def test_tracked_results_are_recognised():
    """Every planned run of the tracked CSV keeps its key under the method objects' defaults:
    regenerating the report or resuming the benchmark recomputes nothing."""
    results = Path(__file__).resolve().parents[1] / bench.DEFAULT_OUT / "results.csv"
    if not results.is_file():
        pytest.skip(f"no tracked benchmark results in {results}")
    found = {row["key"] for row in bench.read_rows(results)}
    defaults = bench.method_defaults()
    missing = [r for r in bench.build_plan("full", oracle=True) if r.key(defaults) not in found]
    assert not missing, f"{len(missing)} planned runs not in {results}, e.g. {missing[0].key(defaults)}"


def test_docs_tables_match_the_tracked_results(tmp_path):
    """docs/benchmarks.md shows exactly what the committed CSV holds (no hand-edited numbers)."""
    root = Path(__file__).resolve().parents[1]
    results, doc = root / bench.DEFAULT_OUT, root / "docs" / "benchmarks.md"
    if not (results / "results.csv").is_file():
        pytest.skip(f"no tracked benchmark results in {results}")
    plan = bench.build_plan("full", oracle=True)
    defaults = bench.method_defaults()
    rows = bench.read_rows(results / "results.csv")
    sections, _, _ = bench.report_sections(plan, rows, bench.read_layers(results / "layers.jsonl"), defaults, tmp_path)
    text = doc.read_text()
    table_lines = [line for section in sections for line in section.splitlines() if line.startswith("|")]
    assert len(table_lines) > 50
    stale = [line for line in table_lines if line not in text]
    assert not stale, (
        f"{len(stale)} table lines of docs/benchmarks.md differ from {results}/results.csv, e.g. {stale[0]!r}; "
        "regenerate it: python -m benchmarks.cifar10_resnets --report-only --oracle --doc docs/benchmarks.md"
    )


# --verify: the comparison logic on fabricated rows (the real recomputation is not run here)


def _row(**changes):
    row = dict(key="k", label="resnet20-jpeg", kind="main", ratio=0.3, method="nm", criterion="l2",
               images=10000, accuracy=54.49, params=185992, macs=28505994, re=26.19734, be=30.5, ae=12.25,
               commit="abc1234")  # fmt: skip
    return {**row, **changes}


def test_verify_compare_detects_mismatches():
    from benchmarks.cifar10_verify import ERRORS_DIFFER, MATCH, MISMATCH, compare

    old = _row()
    assert compare(_row(), old)["status"] == MATCH
    # the accuracy is compared to the 2 decimals reported; RE/BE/AE within 1e-6 relative
    assert compare(_row(accuracy=54.490000001, re=26.19734 * (1 + 5e-7), ae=12.25 * (1 - 5e-7)), old)["status"] == MATCH
    worse = compare(_row(accuracy=54.48), old)
    assert worse["status"] == MISMATCH and worse["differs"] == ["accuracy"]
    assert compare(_row(params=185993), old)["differs"] == ["params"]
    assert compare(_row(macs=28505993, be=31.0), old)["differs"] == ["macs", "be"]
    drift = compare(_row(be=30.5 * (1 + 2e-6)), old)
    assert drift["status"] == ERRORS_DIFFER and drift["differs"] == ["be"] and drift["be_rel"] > 1e-6
    assert compare(_row(re=0.0, be=0.0, ae=0.0), _row(re=0.0, be=0.0, ae=0.0))["status"] == MATCH
    assert compare(_row(ae=float("nan")), old)["status"] == ERRORS_DIFFER


def test_verify_selects_current_main_rows():
    from benchmarks.cifar10_verify import select

    defaults = bench.method_defaults()

    def tracked(label, ratio, method, images=10000, **fields):
        run = bench.Run(label, "main", ratio, method, "l2", *paper_lambdas(method), images=images)
        return _row(key=run.key(defaults), label=label, ratio=ratio, method=method, images=images, **fields)

    rows = [
        tracked("resnet56-jpeg", 0.5, "nm"),
        tracked("resnet20-jpeg", 0.5, "lbyl", kind="input-model"),  # made as a flip: a main run's key, selected
        tracked("resnet20-jpeg", 0.3, "lbyl-paper", images=500),  # at its recorded image count
        tracked("resnet20-jpeg", 0.3, "nm"),
        _row(key="resnet20-jpeg|main|r=0.3|prune|l2|old-settings", method="prune"),  # another key: not selected
        tracked("resnet20-jpeg", 0.3, "prune", criterion="l1"),  # another criterion
        tracked("resnet20", 0.3, "nm"),  # another checkpoint
        tracked("resnet20-jpeg", 0.4, "nm"),  # another ratio
    ]
    labels, methods = ["resnet20-jpeg", "resnet56-jpeg"], ["nm", "lbyl", "lbyl-paper"]
    pairs, missing = select(rows, defaults, labels, [0.3, 0.5], methods)
    assert [(r.label, r.ratio, r.method, r.images) for r, _ in pairs] == [
        ("resnet20-jpeg", 0.3, "nm", 10000), ("resnet20-jpeg", 0.3, "lbyl-paper", 500),
        ("resnet20-jpeg", 0.5, "lbyl", 10000), ("resnet56-jpeg", 0.5, "nm", 10000),
    ]  # fmt: skip
    assert all(row["key"] == run.key(defaults) for run, row in pairs)
    assert len(missing) == 2 * 2 * 3 - 4
    assert ("resnet20-jpeg", 0.3, "lbyl") in {(r.label, r.ratio, r.method) for r in missing}


def test_verify_mode_writes_the_table_not_the_csv(tmp_path, monkeypatch, capsys):
    """The whole --verify path with the recomputation replaced by fabricated rows: a mismatch fails
    the command, verify.md holds the table and the machine, results.csv is untouched."""
    import benchmarks.cifar10_verify as verify
    from benchmarks.cifar10_store import rewrite

    defaults = bench.method_defaults()
    runs = [bench.Run("resnet20-jpeg", "main", 0.3, m, "l2", *paper_lambdas(m)) for m in ("prune", "nm")]
    rows = [_row(key=r.key(defaults), method=r.method, lossless=20, seed=0) for r in runs]
    rewrite(tmp_path / "results.csv", rows)
    before = (tmp_path / "results.csv").read_bytes()
    argv = ["--verify", "--checkpoints", "resnet20-jpeg", "--ratios", "0.3", "--methods", "prune,nm"]
    argv += ["--out", str(tmp_path)]

    def fake(recomputed):
        return lambda runs, *args: iter([dict(r, **recomputed.get(r["method"], {})) for r in rows])

    monkeypatch.setattr(verify, "recompute", fake({}))
    assert bench.main(argv) == 0
    assert "2 rows: 2 match" in (tmp_path / "verify.md").read_text()
    monkeypatch.setattr(verify, "recompute", fake({"nm": dict(accuracy=54.51, params=185990)}))
    assert bench.main(argv) == 1
    assert (tmp_path / "results.csv").read_bytes() == before
    text = (tmp_path / "verify.md").read_text()
    assert "--verify --checkpoints resnet20-jpeg --ratios 0.3 --methods prune,nm --out" in text
    assert "torch " in text and "**Machine:**" in text and "abc1234" in text
    assert "| 54.49 -> 54.51 | 185,992 -> 185,990 |" in text and "MISMATCH (accuracy, params)" in text
    assert "MISMATCH (accuracy, params)" in capsys.readouterr().out
    assert bench.main(["--ratios", "0.3"]) == 1  # the filters belong to --verify
    assert bench.main(["--verify", "--oracle", "--out", str(tmp_path)]) == 1


def test_one_results_schema_for_sweeps_and_benchmarks():
    """Every column a sweep writes is a column of the benchmark CSV, with the same meaning."""
    from benchmarks.cifar10_store import COLUMNS
    from lbyl.sweep import FIELDS

    assert set(FIELDS) <= set(COLUMNS)
