"""benchmarks/ablation.py (docs/ablation.md): every row is a method object, and the report renders."""
import lbyl
from benchmarks import ablation


def test_variants_are_method_objects():
    labels = [label for label, _ in ablation.VARIANTS]
    assert len(set(labels)) == len(labels)
    methods = dict(ablation.VARIANTS)
    assert all(isinstance(m, lbyl.Method) for m in methods.values())
    assert methods["lbyl (defaults: both corrections)"] == lbyl.as_method("lbyl")
    assert methods["prune"] == lbyl.as_method("prune") and methods["nm-paper"] == lbyl.as_method("nm-paper")
    assert methods["prune + correction"].mean_correction and not methods["prune"].mean_correction
    assert methods["lbyl, lambda2 = auto (GCV)"].settings()["lambda2"] == "auto"
    # every lbyl row but the defaults runs without the variance correction, on the white-input loss
    for label, method in ablation.VARIANTS:
        if label.startswith("lbyl,"):
            assert method.name == "lbyl" and not method.variance_correction and method.input_model == "white"


def test_markdown_names_the_command():
    ratios = (0.3, 0.5)
    base = {"resnet20": 86.95}
    table = {("resnet20", label, r): 50.0 for label, _ in ablation.VARIANTS for r in ratios}
    text = ablation.markdown(table, base, ratios, 2000, 1.0)
    assert "`python -m benchmarks.ablation --limit 2000 --ratios 0.3,0.5`" in text
    assert text.count("| 50.00 | 50.00 |") == len(ablation.VARIANTS)
