"""What each ``lbyl`` command does; :mod:`lbyl.cli` parses the arguments."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def status(message: str) -> None:
    """Progress messages go to stderr so that stdout holds only results."""
    print(message, file=sys.stderr, flush=True)


def _example_inputs(spec: str, input_shape):
    import torch

    from .models.registry import example_input, model_info

    if input_shape is not None:
        return torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    if model_info(spec) is None:
        raise ValueError(f"model {spec!r} is not in the registry, so its input shape is unknown: pass --input-shape N,C,H,W")
    return example_input(spec)


def _load_model(args):
    from .models.registry import build_model, load_weights

    kwargs = dict(args.model_arg)
    model = build_model(args.model, **kwargs)
    load_weights(model, args.weights, trust_pickle=args.trust_pickle, spec=args.model)
    return model.eval(), kwargs


def _dataset_and_norm(spec: str, data: str | None):
    """(dataset name, mean, std): the model's own normalisation when the registry knows it."""
    from .data import DATASETS
    from .models.registry import model_info

    info = model_info(spec)
    if data is None:
        if info is None or info.dataset not in DATASETS:
            known = f"made for {info.dataset}, which lbyl cannot load" if info is not None else "not in the registry"
            raise ValueError(f"model {spec!r} is {known}: pass --data fashion-mnist or --data cifar10")
        data = info.dataset
    if info is not None and info.mean is not None:
        return data, info.mean, info.std
    return data, DATASETS[data].mean, DATASETS[data].std


def _load_test_set(name: str, args):
    from .data import assets_root, load_cifar10, load_fashion_mnist
    from .sweep import subset

    if name == "fashion-mnist":
        images, labels = load_fashion_mnist("test", root=args.data_root)
    else:
        root = args.data_root
        if root is None and args.assets_root is not None:
            root = assets_root(args.assets_root) / "cifar10-jpeg"
        images, labels = load_cifar10("test", root=root)
    return subset(images, labels, args.limit)


def _evaluate(model, name, images, labels, mean, std, batch_size, progress=True) -> float:
    from .data import evaluate

    try:
        return evaluate(model, images, labels, batch_size=batch_size, progress=progress, mean=mean, std=std)
    except RuntimeError as error:
        shape = tuple(images.shape[1:])
        raise ValueError(f"the model cannot run on {name} images (shape {shape}): {error}") from None


# ---------------------------------------------------------------------------
# commands


def _layers(args):
    """--layers as restore() takes it: None (default protocol), "all", or a list of patterns."""
    if args.layers is None:
        return None
    return "all" if args.layers == ["all"] else args.layers


def _method(name: str, args):
    """The method object that ``--method name`` and the method flags describe."""
    from . import methods, paper

    flags = {"auto": None, "on": True, "off": False}
    corrections = {k: flags[v] for k, v in (("mean_correction", args.bias_correction),
                                            ("variance_correction", args.variance_correction))}  # fmt: skip
    corrections = {k: v for k, v in corrections.items() if v is not None}
    if name == "lbyl":
        return methods.LBYL(args.lambda1, args.lambda2, args.input_model, scale_spread=args.scale_spread, **corrections)
    if name == "lbyl-paper":
        return paper.LBYL(args.lambda1, args.lambda2, **corrections)
    if name == "nm-paper":
        return paper.NeuronMerging(args.nm_threshold, **corrections)
    return type(methods.as_method(name))(**corrections)


def cmd_restore(args) -> int:
    from .api import restore
    from .io import save_restored

    model, kwargs = _load_model(args)
    inputs = _example_inputs(args.model, args.input_shape)
    method = _method(args.method, args)
    if args.plan is not None:
        from .planning import Plan

        chosen, options = Plan.from_json(Path(args.plan)), {}
        status(f"restoring {args.model}: plan {args.plan}, {method!r} ...")
    else:
        chosen, options = args.ratio, dict(criterion=args.criterion, layers=_layers(args), seed=args.seed,
                                           target_macs=args.target_macs, target_params=args.target_params)  # fmt: skip
        status(f"restoring {args.model}: {_amount(args)}, {method!r}, criterion {args.criterion} ...")
    restored, report = restore(model, inputs, chosen, method, order=args.order, input_stats=args.input_stats, **options)
    print(report.table())
    out = save_restored(
        restored, report, args.out, args.model, model_kwargs=kwargs, source_weights=args.weights,
        input_shape=args.input_shape,
    )  # fmt: skip
    print(f"\nwrote {out}/ (model.safetensors, plan.json, report.json)")
    return 0


def _amount(args) -> str:
    if args.target_macs is not None:
        return f"MAC budget {args.target_macs:g}"
    if args.target_params is not None:
        return f"parameter budget {args.target_params:g}"
    return f"ratio {args.ratio:g}"


def cmd_plan(args) -> int:
    from .api import plan

    model, _ = _load_model(args)
    result = plan(model, _example_inputs(args.model, args.input_shape), args.ratio, criterion=args.criterion,
                  layers=_layers(args), seed=args.seed, target_macs=args.target_macs,
                  target_params=args.target_params)  # fmt: skip
    print(result.table())
    if args.out is not None:
        result.to_json(args.out)
        print(f"\nwrote {args.out}")
    return 0


def cmd_eval(args) -> int:
    import torch
    import torch_pruning as tp

    if args.restored is not None:
        if args.model or args.weights:
            raise ValueError("give either --restored DIR or --model and --weights, not both")
        from .io import load_restored

        model, plan = load_restored(args.restored)
        spec = plan["model"]["spec"]
        inputs = torch.zeros(plan["input_shape"])
        source = f"{spec} restored in {args.restored} ({plan.get('method')}, ratio {plan['settings'].get('ratio')})"
    else:
        if not (args.model and args.weights):
            raise ValueError("give --model and --weights, or --restored DIR")
        model, _ = _load_model(args)
        spec = args.model
        inputs = _example_inputs(spec, args.input_shape)
        source = f"{spec} with {args.weights}"
    data, mean, std = _dataset_and_norm(spec, args.data)
    images, labels = _load_test_set(data, args)
    accuracy = _evaluate(model, data, images, labels, mean, std, args.batch_size, progress=not args.json)
    macs, params = tp.utils.count_ops_and_params(model, inputs)
    if args.json:
        print(json.dumps({"model": source, "data": data, "images": len(labels), "accuracy": accuracy,
                          "params": int(params), "macs": int(macs)}))  # fmt: skip
    else:
        print(f"model       {source}")
        print(f"data        {data} test set, {len(labels):,} images")
        print(f"top-1       {accuracy:.2f}%")
        print(f"parameters  {int(params):,}")
        print(f"MACs        {int(macs):,}")
    return 0


def cmd_sweep(args) -> int:
    from .sweep import format_table, run_sweep, write_outputs

    model, _ = _load_model(args)
    inputs = _example_inputs(args.model, args.input_shape)
    data, mean, std = _dataset_and_norm(args.model, args.data)
    images, labels = _load_test_set(data, args)
    status(f"sweep: {len(args.ratios) * len(args.methods) * len(args.criteria)} restorations, {len(labels):,} {data} images each")
    started = time.perf_counter()
    rows = run_sweep(
        model, inputs, images, labels, args.ratios, [_method(m, args) for m in args.methods], args.criteria,
        mean=mean, std=std, batch_size=args.batch_size, seed=args.seed, order=args.order,
        layers=_layers(args), model_name=args.model, weights_name=Path(args.weights).name,
    )  # fmt: skip
    files, note = write_outputs(rows, args.out, f"{args.model} on {data} ({len(labels):,} test images)")
    print(format_table(rows))
    print(f"\nwrote {', '.join(map(str, files))} in {time.perf_counter() - started:.1f} s")
    if note:
        print(note)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, ratios=args.ratios, fast=args.fast, limit=args.limit)
    return 0


def cmd_export(args) -> int:
    import torch

    from .export import export_model, max_difference
    from .io import load_restored

    format = args.format
    if format is None:
        suffix = Path(args.out).suffix.lower()
        format = "onnx" if suffix == ".onnx" else "torchscript" if suffix in (".pt", ".pth", ".ts") else None
        if format is None:
            raise ValueError(f"cannot tell the format from {args.out!r}: pass --format onnx or --format torchscript")
    model, plan = load_restored(args.restored)
    shape = list(plan["input_shape"])
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        path = export_model(model, example, args.out, format)
    except ImportError as error:
        print(f"lbyl export: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({format}; input shape {shape}, any batch size)")
    batch = torch.randn([2, *shape[1:]], generator=torch.Generator().manual_seed(1))
    try:
        print(f"largest difference from PyTorch on a random batch of 2: {max_difference(model, path, batch, format):.1e}")
    except ImportError:
        print("not checked: install onnxruntime (pip install 'lbyl[export]') to run the ONNX file")
    return 0
