"""Train a registered FashionMNIST model on the FashionMNIST training set (CPU, deterministic).

Usage::

    python -m lbyl.train --epochs 5 --seed 0 --out src/lbyl/assets/demo-cnn-fashion-mnist.safetensors
    python -m lbyl.train --model vit-fashion --out src/lbyl/assets/vit-fashion-mnist.safetensors

Each model has its recipe (:data:`RECIPES`): ``demo-cnn`` trains with SGD,
``vit-fashion`` (torchvision's ``VisionTransformer``; needs torchvision) with
AdamW after a linear warm-up. The checkpoint is a plain safetensors state dict;
the script prints the test-set accuracy at the end. Given the same seed, thread
count and torch version the run is repeatable bit for bit.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import evaluate, load_fashion_mnist, normalize
from .models.registry import build_model, model_info, resolve_name

DEFAULT_MODEL = "demo-cnn"


@dataclass(frozen=True)
class Recipe:
    """How one model is trained; the command line overrides ``epochs``, ``lr`` and ``threads``."""

    optimizer: str  # "sgd" (Nesterov momentum 0.9) or "adamw"
    epochs: int
    lr: float
    weight_decay: float
    threads: int
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # parameters that get no weight decay besides biases and normalisation weights
    no_decay: tuple[str, ...] = ()


RECIPES = {
    "demo-cnn": Recipe("sgd", epochs=8, lr=0.1, weight_decay=5e-4, threads=1),
    # one thread: on two shared cores a training step of this ViT ran five times faster than with two
    "vit-fashion": Recipe(
        "adamw", epochs=20, lr=2e-3, weight_decay=0.05, threads=1, warmup_epochs=1.0, label_smoothing=0.1,
        no_decay=("class_token", "encoder.pos_embedding"),
    ),
}


def recipe_of(model_name: str) -> Recipe:
    name = resolve_name(model_name)
    if name not in RECIPES:
        raise ValueError(f"lbyl.train has no recipe for {model_name!r}; it trains {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def seed_everything(seed: int) -> torch.Generator:
    """Seed every random source the training uses and return a generator for batching."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Random horizontal flips and random shifts of up to ``pad`` pixels.

    FashionMNIST garments are close to left/right symmetric, so flips help;
    small shifts make the net less sensitive to centring. The border is
    filled with the background value (the minimum of the batch).
    """
    n, c, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if pad == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    # crop every image at its own offset with gather instead of a Python loop
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def train(
    epochs: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    lr: float | None = None,
    weight_decay: float | None = None,
    shift: int = 1,
    limit: int | None = None,
    progress: bool = True,
    model_name: str = DEFAULT_MODEL,
) -> torch.nn.Module:
    """Train ``model_name`` with its recipe and a cosine learning-rate schedule.

    ``epochs``, ``lr`` and ``weight_decay`` default to the recipe's.
    """
    recipe = recipe_of(model_name)
    epochs = recipe.epochs if epochs is None else epochs
    lr = recipe.lr if lr is None else lr
    weight_decay = recipe.weight_decay if weight_decay is None else weight_decay
    gen = seed_everything(seed)
    info = model_info(model_name)
    images, labels = load_fashion_mnist("train")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x_all = normalize(images, info.mean, info.std)
    model = build_model(model_name)
    # no weight decay on BN/LayerNorm parameters and biases: it only shrinks the affine terms
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and n not in recipe.no_decay]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1 or n in recipe.no_decay]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr)
    steps_per_epoch = math.ceil(len(x_all) / batch_size)
    total = epochs * steps_per_epoch
    warmup = round(recipe.warmup_epochs * steps_per_epoch)

    def schedule(step: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * step / total))
        return cosine * min(1.0, (step + 1) / warmup) if warmup else cosine

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="train", unit="step")
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        running, seen = 0.0, 0
        for start in range(0, len(x_all), batch_size):
            idx = order[start : start + batch_size]
            x = augment(x_all[idx], gen, shift)
            y = labels[idx]
            loss = F.cross_entropy(model(x), y, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{running / seen:.4f}")
    if bar is not None:
        bar.close()
    model.eval()
    return model


def save_state_dict(model: torch.nn.Module, path: str | os.PathLike, model_name: str = DEFAULT_MODEL) -> Path:
    """Write the model's state dict as safetensors (contiguous copies, no shared storage)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"model": resolve_name(model_name), "format": "pt"})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lbyl.train",
        description="Train a FashionMNIST model of the registry (demo-cnn, or vit-fashion with torchvision) on the "
        "FashionMNIST training set on the CPU and save it as a safetensors state dict. Prints the test-set accuracy.",
    )
    recipes = "; ".join(f"{name}: {r.optimizer}, {r.epochs} epochs, lr {r.lr:g}, {r.threads} thread"
                        for name, r in RECIPES.items())  # fmt: skip
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(RECIPES),
                        help=f"model to train (default {DEFAULT_MODEL}); recipes: {recipes}")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None, help="passes over the 60,000 training images (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for init, shuffling and augmentation (default 0)")
    parser.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate, cosine-decayed to 0 (default: the recipe's)")
    parser.add_argument("--shift", type=int, default=1, help="random shifts of up to this many pixels; 0 turns them off (default 1)")
    # one thread: these small nets gain little from more, and the result then
    # does not depend on how many cores the machine has
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the recipe's, 1)")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only (for quick checks)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    recipe = recipe_of(args.model)
    torch.set_num_threads(args.threads or recipe.threads)
    epochs = args.epochs or recipe.epochs
    started = time.perf_counter()
    model = train(
        epochs, args.seed, args.batch_size, args.lr, shift=args.shift, limit=args.limit, progress=not args.no_progress,
        model_name=args.model,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    path = save_state_dict(model, args.out, args.model)
    info = model_info(args.model)
    test_images, test_labels = load_fashion_mnist("test")
    accuracy = evaluate(model, test_images, test_labels, mean=info.mean, std=info.std)
    print(f"trained {args.model} for {epochs} epochs (seed {args.seed}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}) in {seconds:.0f} s")
    print(f"test accuracy: {accuracy:.2f}% on {len(test_labels):,} FashionMNIST test images")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
