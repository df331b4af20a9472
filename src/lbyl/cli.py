"""Command line interface: ``lbyl restore | eval | sweep | demo | export``.

Run ``lbyl --help`` or ``lbyl <command> --help`` for the details.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from . import commands

METHOD_HELP = """\
methods (how the information of removed channels is handed to the kept ones):
  prune       remove the channels and do nothing else (the baseline)
  nm          Neuron Merging: each removed channel is merged into its most
              similar kept channel (cosine similarity), scaled so that the
              next layer sees the same signal when the filters are parallel
  lbyl        LBYL, "Leave Before You Leave": each removed channel is
              approximated by a least-squares combination of all kept
              channels (closed form), and the next layer's weights are
              updated with it
  nm-paper, lbyl-paper
              the two methods exactly as their authors' code computes them;
              only for reproducing published tables

criteria (which channels of a layer are kept):
  auto        least-loss for the hidden layers of transformer MLPs (layers
              without BatchNorm whose kept neurons span their input), l2
              elsewhere (default)
  l2          keep the filters with the largest L2 norm
  l1          keep the filters with the largest L1 norm
  l2gm        keep the filters farthest from the others (geometric median)
  random      keep a random subset (seeded by --seed)
  least-loss  keep the channels that LBYL rebuilds the others from best,
              under the model's own statistics (greedy, no data)

ratio: the fraction of output channels removed from every restorable layer;
  0.5 removes half of the channels (a layer with n channels keeps
  floor(n * (1 - ratio)), at least one). Layers whose channels feed a residual
  addition or the model output cannot be pruned; the report lists them.
"""

MODEL_HELP = (
    "model: a registry name ({names}) or 'package.module:factory' for your own model "
    "(then also pass --input-shape)"
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-written line breaks of descriptions and epilogs; wider help column."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction such as 0.5") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"ratio {text} is outside [0, 1): it is the fraction of channels removed")
    return value


def _ratio_list(text: str) -> list[float]:
    values = [_ratio(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one ratio, e.g. 0.1,0.3,0.5")
    return values


def _choice_list(choices):
    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from {', '.join(choices)}"
            )
        return values

    return parse


def _nonneg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def _lambda2(text: str) -> float | str:
    return "auto" if text.strip().lower() == "auto" else _nonneg(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _shape(text: str) -> list[int]:
    try:
        shape = [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape such as 1,3,32,32") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape such as 1,3,32,32")
    return shape


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. num_classes=100)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare word is a string


def _add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    from .models.registry import available_models

    parser.add_argument("--model", required=required, metavar="SPEC", help=MODEL_HELP.format(names=", ".join(available_models())))
    parser.add_argument("--weights", required=required, metavar="FILE",
                        help="checkpoint of the trained model: .safetensors, or a PyTorch state dict (.pt/.pth/.th)")  # fmt: skip
    parser.add_argument("--model-arg", action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
                        help="keyword argument for the model factory, e.g. num_classes=100 (repeatable; VALUE is JSON)")  # fmt: skip
    parser.add_argument("--input-shape", type=_shape, metavar="N,C,H,W",
                        help="input shape used to trace the model; needed only for 'package.module:factory' models")  # fmt: skip
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow checkpoints that need full unpickling (can run arbitrary code: only for files you trust)")  # fmt: skip


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=("fashion-mnist", "cifar10"), metavar="NAME",
                        help="test set: fashion-mnist or cifar10 (default: the dataset the model was made for)")  # fmt: skip
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate on N test images spread evenly over the test set")
    parser.add_argument("--batch-size", type=_positive_int, default=500, metavar="N", help="evaluation batch size (default 500)")
    parser.add_argument("--assets-root", metavar="PATH",
                        help="folder of the shared assets (CIFAR-10 JPEG copy); default $LBYL_ASSETS or ../shared/assets")  # fmt: skip
    parser.add_argument("--data-root", metavar="PATH",
                        help="folder (or CIFAR-10 tarball) holding the test set itself; overrides --assets-root")  # fmt: skip


def _add_restore_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lambda1", type=_nonneg, default=0.0, metavar="X",
                        help="LBYL only: weight of the BatchNorm-bias term in the loss (default 0)")  # fmt: skip
    parser.add_argument("--lambda2", type=_lambda2, default=0.0, metavar="X",
                        help="LBYL only: ridge penalty on the merge coefficients (default 0); 'auto' picks it per "
                        "layer by generalised cross-validation on the weights (no data); try 0.1 at high ratios")  # fmt: skip
    parser.add_argument("--bias-correction", choices=("auto", "on", "off"), default="auto",
                        help="add back the mean input the removed channels gave the next layer, computed from "
                        "the BatchNorm statistics (no data); auto: on for lbyl, off for the others (default)")  # fmt: skip
    parser.add_argument("--variance-correction", choices=("auto", "on", "off"), default="auto",
                        help="rescale the running variance of the BatchNorm after each consumer by the predicted "
                        "change of its input's variance (no data); auto: on for lbyl, off for the others (default)")  # fmt: skip
    parser.add_argument("--input-model", choices=("propagated", "white", "bn"), default="propagated",
                        help="LBYL only: covariance model of the BN outputs; propagated: the input covariance of "
                        "1x1 and Linear layers propagated through the layers before them, white elsewhere (default); "
                        "white: the paper's plain filter distance; bn: the input covariance estimated from the "
                        "BatchNorm variances")  # fmt: skip
    parser.add_argument("--scale-spread", type=float, default=0.5, metavar="X",
                        help="LBYL only: in a depthwise chain (inverted residual), model the inputs of the activations "
                        "as Gaussians scaled by one factor shared by a position's channels, log-normal with this "
                        "spread (default 0.5, kurtosis 8.2; 0: Gaussian)")  # fmt: skip
    parser.add_argument("--nm-threshold", type=float, default=None, metavar="X",
                        help="nm-paper only: merge a pruned channel only when its cosine similarity to the chosen "
                        "kept one is at least X (the released LeNet script uses 0.45; default: merge all)")  # fmt: skip
    parser.add_argument("--layers", nargs="+", metavar="PATTERN",
                        help="prune only these layers (names or glob patterns such as 'layer1.*'), or 'all' for every "
                        "restorable layer; default: the papers' protocol (every restorable convolution of a CNN, "
                        "every hidden Linear layer of an MLP)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed for --criterion random (default 0)")
    parser.add_argument("--order", choices=("original", "sequential"), default="original",
                        help="original: every layer is restored from the original weights (the papers' protocol, "
                        "default); sequential: each layer sees the edits of the layers before it")  # fmt: skip


def _input_stats(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        mean, std = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MEAN,STD (two numbers, e.g. -0.43,0.71)") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise argparse.ArgumentTypeError(f"{text}: the mean must be finite and the std a finite number > 0")
    return mean, std


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be a fraction in (0, 1]")
    return value


def _add_budget_args(group) -> None:
    group.add_argument("--target-macs", type=_fraction, metavar="F",
                       help="keep at most this fraction of the MACs (e.g. 0.6): the smallest uniform ratio that meets it")  # fmt: skip
    group.add_argument("--target-params", type=_fraction, metavar="F",
                       help="keep at most this fraction of the parameters (e.g. 0.6)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lbyl`` command."""
    from .criteria import CRITERIA
    from .methods import METHODS

    parser = argparse.ArgumentParser(
        prog="lbyl",
        formatter_class=_Formatter,
        description=(
            "Prune channels of a trained CNN and restore its accuracy without data or fine-tuning.\n"
            "Run 'lbyl <command> --help' for each command's options."
        ),
        epilog=(
            "examples:\n"
            "  lbyl demo                                   # prune the bundled FashionMNIST CNN\n"
            "  lbyl restore --model resnet56 --weights resnet56.th --ratio 0.5 --method lbyl --out r56-lbyl\n"
            "  lbyl eval --restored r56-lbyl --data cifar10\n"
            "  lbyl sweep --model resnet56 --weights resnet56.th --ratios 0.1,0.3,0.5 --out r56-sweep\n"
        ),
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lbyl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # restore ---------------------------------------------------------------
    p = sub.add_parser(
        "restore",
        formatter_class=_Formatter,
        help="prune a model, restore it without data, save the result",
        description=(
            "Remove a fraction of the output channels of every restorable layer, compensate with\n"
            "the chosen method, print a per-layer report and save the smaller model to --out\n"
            "(model.safetensors, plan.json, report.json; reload it with 'lbyl eval --restored').\n\n"
            + METHOD_HELP
        ),
        epilog=(
            "examples:\n"
            "  lbyl restore --model resnet56 --weights resnet56.th --ratio 0.5 --method lbyl --out r56-lbyl\n"
            "  lbyl restore --model demo-cnn --weights demo.safetensors --ratio 0.3 --method nm \\\n"
            "      --criterion l1 --layers 'conv*' --out demo-nm\n"
            "  lbyl restore --model mypkg.nets:small_cnn --input-shape 1,3,32,32 --weights small.pt \\\n"
            "      --ratio 0.4 --method lbyl --lambda1 0.1 --lambda2 0.01 --out small-lbyl\n"
        ),
    )
    _add_model_args(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ratio", type=_ratio, metavar="R", help="fraction of channels removed per layer, in [0, 1)")
    which.add_argument("--plan", metavar="FILE", help="a plan written by 'lbyl plan --out FILE' (possibly edited)")
    _add_budget_args(which)
    p.add_argument("--method", choices=METHODS, default="lbyl", metavar="M", help=f"one of {', '.join(METHODS)} (default lbyl)")
    p.add_argument("--criterion", choices=CRITERIA, default="auto", metavar="C", help=f"one of {', '.join(CRITERIA)} (default auto)")
    _add_restore_args(p)
    p.add_argument("--input-stats", type=_input_stats, metavar="MEAN,STD",
                   help="mean and standard deviation of the model's input after your preprocessing, for the "
                   "statistics of layers without BatchNorm that read it (default 0,1: standardised)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the restored model to")
    p.set_defaults(func=commands.cmd_restore)

    # plan ------------------------------------------------------------------
    p = sub.add_parser(
        "plan",
        formatter_class=_Formatter,
        help="a dry run: the layers and channels 'lbyl restore' would remove, and the predicted size",
        description=(
            "Find the restorable layers, choose the kept channels of each and predict the parameters\n"
            "and MACs after removal, without restoring anything. Edit the JSON it writes (the 'kept'\n"
            "list of a layer) and pass it to 'lbyl restore --plan FILE'."
        ),
        epilog="example:\n  lbyl plan --model resnet56 --weights resnet56.th --ratio 0.3 --out r56-plan.json\n",
    )
    _add_model_args(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ratio", type=_ratio, metavar="R", help="fraction of channels removed per layer, in [0, 1)")
    _add_budget_args(which)
    p.add_argument("--criterion", choices=CRITERIA, default="auto", metavar="C", help=f"one of {', '.join(CRITERIA)} (default auto)")
    p.add_argument("--layers", nargs="+", metavar="PATTERN", help="as for 'lbyl restore'")
    p.add_argument("--seed", type=int, default=0, help="seed for --criterion random (default 0)")
    p.add_argument("--out", metavar="FILE", help="write the plan as JSON to FILE")
    p.set_defaults(func=commands.cmd_plan)

    # eval --------------------------------------------------------------------
    p = sub.add_parser(
        "eval",
        formatter_class=_Formatter,
        help="top-1 accuracy, parameters and MACs of a model or a restored model",
        description=(
            "Evaluate a trained model (--model and --weights) or a model saved by 'lbyl restore'\n"
            "(--restored) on a test set: prints top-1 accuracy, parameter count and MACs\n"
            "(multiply-accumulates for one input). Inputs are normalised as the model expects."
        ),
        epilog=(
            "examples:\n"
            "  lbyl eval --model resnet56 --weights resnet56.th --data cifar10\n"
            "  lbyl eval --restored r56-lbyl --limit 1000\n"
            "  lbyl eval --restored demo-nm --json\n"
        ),
    )
    _add_model_args(p, required=False)
    p.add_argument("--restored", metavar="DIR", help="folder written by 'lbyl restore' (instead of --model/--weights)")
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=commands.cmd_eval)

    # sweep -------------------------------------------------------------------
    p = sub.add_parser(
        "sweep",
        formatter_class=_Formatter,
        help="accuracy over a grid of ratios, methods and criteria (CSV, Markdown, plot)",
        description=(
            "Restore a model at every combination of --ratios, --methods and --criteria, evaluate\n"
            "each, and write results.csv, results.md and accuracy.png (accuracy against ratio,\n"
            "dashed line: the unpruned model) to --out.\n\n" + METHOD_HELP
        ),
        epilog=(
            "examples:\n"
            "  lbyl sweep --model resnet56 --weights resnet56.th --ratios 0.1,0.3,0.5 --out r56-sweep\n"
            "  lbyl sweep --model demo-cnn --weights demo.safetensors --ratios 0.2,0.4,0.6 \\\n"
            "      --methods nm,lbyl --criteria l1,l2 --limit 2000 --out demo-sweep\n"
        ),
    )
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--ratios", type=_ratio_list, default=[0.1, 0.3, 0.5, 0.7], metavar="R,R,...",
                   help="comma-separated fractions of channels removed (default 0.1,0.3,0.5,0.7)")  # fmt: skip
    p.add_argument("--methods", type=_choice_list(METHODS), default=["prune", "nm", "lbyl"], metavar="M,M,...",
                   help=f"comma-separated methods from {', '.join(METHODS)} (default prune,nm,lbyl)")  # fmt: skip
    p.add_argument("--criteria", type=_choice_list(CRITERIA), default=["auto"], metavar="C,C,...",
                   help=f"comma-separated criteria from {', '.join(CRITERIA)} (default auto)")  # fmt: skip
    _add_restore_args(p)
    p.add_argument("--out", default="sweep-output", metavar="DIR", help="output folder (default sweep-output)")
    p.set_defaults(func=commands.cmd_sweep)

    # demo --------------------------------------------------------------------
    p = sub.add_parser(
        "demo",
        formatter_class=_Formatter,
        help="prune the bundled FashionMNIST CNN with prune, nm and lbyl and compare",
        description=(
            "Load the small CNN that ships with lbyl (trained on FashionMNIST), remove 10% to 70%\n"
            "of the channels of every layer with prune, nm and lbyl, evaluate each on the 10,000\n"
            "FashionMNIST test images, print a table and write results.csv, results.md and\n"
            "accuracy.png to --out. Needs the FashionMNIST test set: on Debian/Ubuntu\n"
            "'apt-get install dataset-fashion-mnist', or set LBYL_FASHION_MNIST to a folder\n"
            "holding the idx files. Takes about two minutes on two CPU cores."
        ),
        epilog=(
            "examples:\n"
            "  lbyl demo\n"
            "  lbyl demo --out /tmp/demo --ratios 0.25,0.5,0.75\n"
            "  lbyl demo --fast          # two ratios, 1,000 images: a quick check\n"
        ),
    )
    p.add_argument("--out", default="demo-output", metavar="DIR", help="output folder (default demo-output)")
    p.add_argument("--ratios", type=_ratio_list, metavar="R,R,...", help="fractions of channels removed (default 0.1,0.2,...,0.7)")
    p.add_argument("--fast", action="store_true", help="quick run: ratios 0.3,0.6 on 1,000 of the test images")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate on N test images spread evenly over the test set")
    p.set_defaults(func=commands.cmd_demo)

    # export ------------------------------------------------------------------
    p = sub.add_parser(
        "export",
        formatter_class=_Formatter,
        help="write a restored model as ONNX or TorchScript for deployment",
        description=(
            "Rebuild a model saved by 'lbyl restore' and write it as an ONNX or TorchScript file\n"
            "that runs without lbyl (the batch dimension stays free). ONNX needs\n"
            "pip install 'lbyl[export]'; with onnxruntime installed the file is checked against\n"
            "PyTorch on a random batch."
        ),
        epilog=(
            "examples:\n"
            "  lbyl export --restored r56-lbyl --format onnx --out r56-lbyl.onnx\n"
            "  lbyl export --restored r56-lbyl --out r56-lbyl.pt      # TorchScript, from the suffix\n"
        ),
    )
    p.add_argument("--restored", required=True, metavar="DIR", help="folder written by 'lbyl restore'")
    p.add_argument("--format", choices=("onnx", "torchscript"), metavar="FORMAT",
                   help="onnx or torchscript (default: from the --out suffix, .onnx or .pt)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="FILE", help="file to write")
    p.set_defaults(func=commands.cmd_export)

    # bench -------------------------------------------------------------------
    from .bench import speed as bench_speed

    bench_speed.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lbyl`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        commands.status("interrupted")
        return 130
    except (ValueError, FileNotFoundError, OSError, ImportError) as error:
        # expected problems (bad paths, mismatched weights, missing data, an optional package such as
        # torchvision not installed): one clear line, no traceback
        print(f"lbyl {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
