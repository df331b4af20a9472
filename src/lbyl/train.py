"""Train the demo CNN on the FashionMNIST training set (CPU, deterministic).

Usage::

    python -m lbyl.train --epochs 5 --seed 0 --out src/lbyl/assets/demo-cnn-fashion-mnist.safetensors

The checkpoint is a plain safetensors state dict; the script prints the
test-set accuracy at the end. Given the same seed, thread count and torch
version the run is repeatable bit for bit.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import evaluate, load_fashion_mnist, normalize
from .models.registry import build_model, model_info

MODEL = "demo-cnn"


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
    epochs: int = 5,
    seed: int = 0,
    batch_size: int = 256,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    shift: int = 1,
    limit: int | None = None,
    progress: bool = True,
) -> torch.nn.Module:
    """Train ``demo-cnn`` with SGD + momentum and a cosine learning-rate schedule."""
    gen = seed_everything(seed)
    info = model_info(MODEL)
    images, labels = load_fashion_mnist("train")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x_all = normalize(images, info.mean, info.std)
    model = build_model(MODEL)
    # no weight decay on BN parameters and biases: it only shrinks the affine terms
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )
    steps_per_epoch = math.ceil(len(x_all) / batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
    )
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
            loss = F.cross_entropy(model(x), y)
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


def save_state_dict(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's state dict as safetensors (contiguous copies, no shared storage)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"model": MODEL, "format": "pt"})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lbyl.train",
        description="Train the demo CNN (demo-cnn) on the FashionMNIST training set on the CPU "
        "and save it as a safetensors state dict. Prints the test-set accuracy.",
    )
    parser.add_argument("--epochs", type=int, default=8, help="passes over the 60,000 training images (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for init, shuffling and augmentation (default 0)")
    parser.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate, cosine-decayed to 0 (default 0.1)")
    parser.add_argument("--shift", type=int, default=1, help="random shifts of up to this many pixels; 0 turns them off (default 1)")
    # one thread: this small net gains little from more, and the result then
    # does not depend on how many cores the machine has
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only (for quick checks)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = train(
        args.epochs, args.seed, args.batch_size, args.lr, shift=args.shift, limit=args.limit, progress=not args.no_progress
    )
    seconds = time.perf_counter() - started
    path = save_state_dict(model, args.out)
    info = model_info(MODEL)
    test_images, test_labels = load_fashion_mnist("test")
    accuracy = evaluate(model, test_images, test_labels, mean=info.mean, std=info.std)
    print(f"trained {MODEL} for {args.epochs} epochs (seed {args.seed}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}) in {seconds:.0f} s")
    print(f"test accuracy: {accuracy:.2f}% on {len(test_labels):,} FashionMNIST test images")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
