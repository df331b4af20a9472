"""The ViT MLP benchmark (benchmarks/vit_mlp.py), its CSV and docs/transformers.md.

The document and the row logic are checked everywhere. The checkpoint and the smoke run
need torchvision (the ViT is torchvision's class) and the FashionMNIST test set: they skip
without torchvision (the torch 2.14 CI run, ``make test-torch-2.14``, has it) and, with
torchvision, fail under CI=true when the data is missing.
"""
import importlib.util
import os

import pytest

from benchmarks import vit_mlp
from benchmarks.vit_mlp import ERROR, OK, UNPRUNED, Run

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
needs_torchvision = pytest.mark.skipif(
    not HAS_TORCHVISION,
    reason="the ViT is torchvision's VisionTransformer and torchvision is not installed here; "
    "the torch 2.14 CI run (make test-torch-2.14) has it",
)


def fashion_mnist_test():
    from lbyl.data import load_fashion_mnist

    try:
        return load_fashion_mnist("test")
    except FileNotFoundError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"FashionMNIST test set missing on CI: {error}")
        pytest.skip(f"FashionMNIST test set not available: {error}")


def tracked_rows():
    rows = vit_mlp.read_rows()
    assert rows, f"{vit_mlp.CSV_PATH} is missing or empty; run {vit_mlp.COMMAND}"
    return rows


# --- the tracked results ----------------------------------------------------------------------


def test_document_is_generated_from_the_csv():
    expected = vit_mlp.render(tracked_rows())
    assert vit_mlp.DOC_PATH.read_text() == expected, (
        f"docs/transformers.md does not match the CSV; regenerate it: {vit_mlp.COMMAND} --report-only"
    )


def test_tracked_rows_are_complete_and_honest():
    rows = tracked_rows()
    assert all(set(r) == set(vit_mlp.COLUMNS) for r in rows)
    for r in rows:
        if r["status"] == OK:
            assert 0 <= float(r["accuracy"]) <= 100 and not r["error"], r["key"]
            if r["method"] != UNPRUNED:  # a result is a restoration that really removed neurons
                assert int(r["hidden_after"]) < int(r["hidden_before"]), r["key"]
        else:
            assert r["status"] == ERROR and r["error"] and not r["accuracy"], r["key"]
    base = [r for r in rows if r["method"] == UNPRUNED and r["images"] == "10000"]
    assert len(base) == 1 and base[0]["status"] == OK


# --- the row logic on made-up rows -------------------------------------------------------------


def fake_row(method, ratio, accuracy=None, error="", images=10000, digest="d" * 64, finished="2026-01-01 00:00:00",
             criterion="l2"):
    run = Run(method, ratio, criterion)
    row = dict.fromkeys(vit_mlp.COLUMNS, "")
    row.update(
        key=run.key(digest, images), model=vit_mlp.MODEL, weights=vit_mlp.WEIGHTS, weights_sha256=digest,
        method=method, ratio=f"{ratio:g}", images=str(images), status=ERROR if error else OK, error=error,
        accuracy="" if error else f"{accuracy:.2f}", hidden_before="1024", mlp_layers="4", finished=finished,
        hidden_after=str(round(1024 * (1 - ratio))), layers_restored="0" if method == UNPRUNED else "4",
        params="100", macs="1000", machine="test machine", commit="abc1234",
        criterion="-" if method == UNPRUNED else criterion,
    )  # fmt: skip
    return row


def test_keys_hold_every_setting_that_changes_a_result():
    keys = {
        Run("lbyl", 0.5).key("a" * 64, 10000), Run("lbyl", 0.3).key("a" * 64, 10000),
        Run("nm", 0.5).key("a" * 64, 10000), Run("lbyl", 0.5).key("b" * 64, 10000),
        Run("lbyl", 0.5).key("a" * 64, 1000), Run(UNPRUNED).key("a" * 64, 10000),
    }  # fmt: skip
    keys.add(Run("lbyl", 0.5, "auto").key("a" * 64, 10000))
    assert len(keys) == 7
    key = Run("lbyl", 0.5).key("a" * 64, 10000)
    import lbyl

    # the method's resolved options, the criterion and the layer patterns are part of it
    for part in ('"method": "lbyl"', *(f'"{k}"' for k in lbyl.LBYL().settings()), "l2", "encoder.layers.*.mlp.0"):
        assert part in key, part


def test_results_are_kept_and_errors_retried():
    digest = "d" * 64
    rows = [
        fake_row(UNPRUNED, 0.0, 90.0),
        fake_row("prune", 0.5, error="ValueError: no restorable layer found"),
        fake_row("nm", 0.5, error="ValueError: no restorable layer found"),
        fake_row("nm", 0.5, 85.0),  # the error of this run was retried and now has a result
        fake_row("lbyl", 0.5, 88.0, digest="e" * 64),  # another checkpoint
    ]
    plan = vit_mlp.build_plan(ratios=[0.5], criteria=["l2"])
    todo = vit_mlp.pending(plan, rows, digest, 10000)
    assert [(r.method, r.ratio) for r in todo] == [("prune", 0.5), ("lbyl", 0.5)]
    assert vit_mlp.pending(plan, rows, digest, 500) == plan  # another image count is another run
    assert vit_mlp.latest_by_key(rows)[Run("nm", 0.5).key(digest, 10000)]["accuracy"] == "85.00"


def test_report_and_targets_from_made_up_rows():
    # unpruned 90; with either criterion lbyl wins from 20 %; the default (auto) loses at most half of
    # what plain pruning (prune, l2) loses at 50 and 70 %, but not half of prune on its own channels
    l2 = {0.1: (89.0, 89.5, 89.6), 0.2: (88.0, 88.5, 89.0), 0.5: (80.0, 84.0, 86.0), 0.7: (60.0, 65.0, 70.0)}
    auto = {0.2: (88.5, 88.7, 89.2), 0.5: (84.0, 85.0, 86.5), 0.7: (72.0, 73.0, 76.0)}
    rows = [fake_row(UNPRUNED, 0.0, 90.0)]
    for criterion, table in (("l2", l2), ("auto", auto)):
        for ratio, accuracies in table.items():
            rows += [fake_row(m, ratio, a, criterion=criterion) for m, a in zip(vit_mlp.METHODS, accuracies)]
    rows += [fake_row(m, 0.8, a) for m, a in zip(vit_mlp.METHODS, (50.0, 45.0, 20.0))]  # shown, not a target
    found = vit_mlp.targets(rows)
    assert [s for _, s, _ in found] == ["met", "met", "met", "met", "met", "not met", "not met", "not met"]
    assert "80 %" not in found[0][2] and "| 80 % | 205 / 1024 | 100 | 50.00 | 45.00 | 20.00 |" in vit_mlp.render(rows)
    assert "plain pruning (`prune`, `l2`)" in found[3][0] and "loses 14.00 points, `prune` 30.00" == found[3][2]
    doc = vit_mlp.render(rows)
    assert "| 50 % | 512 / 1024 | 100 | 80.00 | 84.00 | 86.00 |" in doc
    assert "| 50 % | 512 / 1024 | 100 | 84.00 | 85.00 | 86.50 |" in doc
    assert doc.index("### Neurons chosen by `l2`") < doc.index("### Neurons chosen by `auto` (the default)")
    assert "img/vit-mlp.png" in doc and "test machine" in doc

    # lbyl below nm at 20 %: the first target fails; a missing run is "not measured", never met
    rows[5] = fake_row("nm", 0.2, 89.5)
    assert [s for _, s, _ in vit_mlp.targets(rows)][0] == "not met"
    partial = [r for r in rows if not (r["method"] == "lbyl" and r["ratio"] == "0.7" and r["criterion"] == "auto")]
    assert [s for _, s, _ in vit_mlp.targets(partial)][3] == "not measured"

    # only errors: no plot, every target not measured, the error shown with its count
    errors = [fake_row(UNPRUNED, 0.0, 90.0)] + [fake_row(m, 0.5, error="ValueError: nothing") for m in vit_mlp.METHODS]
    doc = vit_mlp.render(errors)
    assert "img/vit-mlp.png" not in doc and "- 3 runs, lbyl commit abc1234: `ValueError: nothing`" in doc
    assert [s for _, s, _ in vit_mlp.targets(errors)] == ["not measured"] * 5


def test_report_shows_the_most_recent_checkpoint_only():
    old = [fake_row(UNPRUNED, 0.0, 80.0, digest="a" * 64), fake_row("prune", 0.5, 70.0, digest="a" * 64)]
    new = [fake_row(UNPRUNED, 0.0, 90.0, finished="2026-02-01 00:00:00"), fake_row("prune", 0.5, 85.0)]
    doc = vit_mlp.render(old + new)
    assert "**90.00 %**" in doc and "70.00" not in doc and "a" * 64 not in doc


# --- the real model (torchvision) --------------------------------------------------------------


@needs_torchvision
def test_checkpoint_scores_its_recorded_accuracy():
    import torch

    from lbyl.data import evaluate
    from lbyl.demo import load_bundled_model
    from lbyl.models.registry import model_info

    from lbyl.sweep import subset

    images, labels = subset(*fashion_mnist_test(), 2000)
    base = next(r for r in tracked_rows() if r["method"] == UNPRUNED and r["images"] == "10000")
    with vit_mlp.bundled_checkpoint() as path:
        assert vit_mlp.sha256(path) == base["weights_sha256"], "the bundled checkpoint is not the one measured"
        assert path.stat().st_size < 5_000_000
    model = load_bundled_model("vit-fashion")
    info = model_info("vit-fashion")
    torch.set_num_threads(1)
    accuracy = evaluate(model, images, labels, batch_size=1000, mean=info.mean, std=info.std)
    # 2,000 of the 10,000 images, evenly spread: the sampling error of the subset is about 0.7 points
    # (binomial), so 2.5 points is four of them; a model that is built or loaded wrong is far off
    assert abs(accuracy - float(base["accuracy"])) < 2.5, (accuracy, base["accuracy"])


@needs_torchvision
def test_smoke_run_resumes(tmp_path, capsys):
    fashion_mnist_test()
    csv_path, doc = tmp_path / "results.csv", tmp_path / "docs" / "transformers.md"
    doc.parent.mkdir()
    args = ["--csv", str(csv_path), "--methods", "prune", "--ratios", "0.5", "--criteria", "l2", "--limit", "200"]
    assert vit_mlp.main(args) == 0
    first = vit_mlp.read_rows(csv_path)
    assert [r["method"] for r in first] == [UNPRUNED, "prune"]
    assert first[0]["status"] == OK and 70 < float(first[0]["accuracy"]) <= 100 and first[0]["images"] == "200"
    prune = first[1]
    assert prune["status"] in (OK, ERROR)
    if prune["status"] == OK:  # the MLP blocks are restorable: half of the 1,024 hidden neurons are gone
        assert (prune["hidden_after"], prune["layers_restored"]) == ("512", "4")
    else:
        assert "no restorable layer" in prune["error"]

    assert vit_mlp.main([*args, "--doc", str(doc)]) == 0
    second = vit_mlp.read_rows(csv_path)
    # the unpruned result is kept; an error is tried again, a result is not
    assert second[: len(first)] == first
    assert [r["method"] for r in second[len(first) :]] == ([] if prune["status"] == OK else ["prune"])
    assert doc.read_text() == vit_mlp.render(second)
    assert vit_mlp.main(["--csv", str(csv_path), "--report-only", "--doc", str(doc)]) == 0
    assert doc.read_text() == vit_mlp.render(second)


def test_plot_of_made_up_results(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the 'plot' extra)")
    rows = [fake_row(UNPRUNED, 0.0, 90.0)] + [fake_row(m, 0.5, a) for m, a in zip(vit_mlp.METHODS, (80.0, 84.0, 86.0))]
    doc = tmp_path / "docs" / "transformers.md"
    vit_mlp.write_report(rows, doc)
    assert (doc.parent / "img" / vit_mlp.PLOT_NAME).stat().st_size > 10_000
    assert doc.read_text() == vit_mlp.render(rows)
    only_errors = [rows[0], fake_row("lbyl", 0.5, error="ValueError: nothing")]
    assert vit_mlp.plot(only_errors, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


@needs_torchvision
def test_the_default_criterion_is_least_loss_in_every_block_at_the_measured_ratios():
    from lbyl.graph import find_groups
    from lbyl.models.registry import build_model, example_input
    from lbyl.planning import layer_criterion, select_groups

    model = build_model(vit_mlp.MODEL).eval()
    groups, skipped = find_groups(model, example_input(vit_mlp.MODEL))
    fc1 = select_groups(groups, skipped, list(vit_mlp.MLP_LAYERS))
    assert len(fc1) == 4
    for ratio in (r for r in vit_mlp.RATIOS if r <= 0.75):
        assert {layer_criterion(g, ratio, "auto") for g in fc1} == {"least-loss"}, ratio
    assert {layer_criterion(g, 0.8, "auto") for g in fc1} == {"l2"}  # 51 kept neurons cannot span 64 features
