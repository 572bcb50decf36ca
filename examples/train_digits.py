"""SGD vs SAM vs BiSAM(tanh) vs BiSAM(log) on scikit-learn's bundled handwritten digits (no download).

A small CNN with BatchNorm (convolutions without bias, as in ResNets) is trained from the same
initialisation, on the same batches, for the same number of epochs with each optimizer; SAM and BiSAM
use ``bk.SAM``/``bk.BiSAM`` with ``bk.bisam_step`` (two forward/backward passes per step). The table
gives the test accuracy, the test cross-entropy and the training seconds per epoch.

    python examples/train_digits.py            # the full comparison (about a minute on 2 CPU cores, 3 seeds)
    python examples/train_digits.py --quick    # a few seconds, for CI
    python examples/train_digits.py --help     # every option, with its default
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import bisam_kernels as bk


def load_digits_tensors(seed: int, test_fraction: float = 0.25, label_noise: float = 0.0):
    """(x_train, y_train, x_test, y_test): 8x8 images scaled to [0, 1], standardised with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed, stratify=y.numpy()
    )
    x_train, y_train = x[idx_train], y[idx_train].clone()
    x_test, y_test = x[idx_test], y[idx_test]
    if label_noise > 0:  # symmetric noise on the training labels only
        gen = torch.Generator().manual_seed(seed + 1)
        flip = torch.rand(len(y_train), generator=gen) < label_noise
        y_train[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=gen)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def make_model(width: int = 16, num_classes: int = 10) -> nn.Module:
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, width, 1),
        *block(width, 2 * width, 2),
        *block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


class Method(NamedTuple):
    display_name: str  # as printed in the table
    ascent_loss: str | None  # for bisam_step; None trains with plain SGD


METHODS = {  # keyed by the name given to --methods
    "sgd": Method("SGD", None),
    "sam": Method("SAM", "cross_entropy"),
    "bisam_tanh": Method("BiSAM (tanh)", "tanh"),
    "bisam_log": Method("BiSAM (log)", "log"),
}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch])
        loss += F.cross_entropy(logits, y[i : i + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[i : i + batch]).sum().item()
    model.train()
    return correct / len(y), loss / len(y)


def train(method: str, init: nn.Module, data, args, seed: int) -> dict:
    x_train, y_train, x_test, y_test = data
    model = copy.deepcopy(init)
    kw = dict(lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True)
    name, ascent = METHODS[method]
    if ascent is None:
        opt = torch.optim.SGD(model.parameters(), **kw)
    else:
        opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=args.rho, **kw)
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(seed)  # the same batches for every method
    seconds = 0.0
    bar = tqdm(total=args.epochs, desc=f"{name:>12}", leave=False, disable=args.no_progress, file=sys.stderr)
    for _ in range(args.epochs):
        order = torch.randperm(len(y_train), generator=gen)
        start = time.perf_counter()
        for i in range(0, len(y_train), args.batch_size):
            idx = order[i : i + args.batch_size]
            x, y = x_train[idx], y_train[idx]
            if ascent is None:
                F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing).backward()
                opt.step()
                opt.zero_grad()
            else:
                bk.bisam_step(model, opt, x, y, ascent_loss=ascent, label_smoothing=args.label_smoothing)
            sched.step()
        seconds += time.perf_counter() - start
        if not args.no_progress:
            acc, loss = evaluate(model, x_test, y_test)
            # drawn by the update below, so the metrics appear next to the count of the epoch they belong to
            bar.set_postfix(test_acc=f"{acc:.4f}", test_loss=f"{loss:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    acc, loss = evaluate(model, x_test, y_test)
    return dict(method=name, acc=acc, loss=loss, sec_per_epoch=seconds / args.epochs)


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds, per method (in the order first seen)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        row = {"method": method}
        for key in ("acc", "loss", "sec_per_epoch"):
            vals = torch.tensor([r[key] for r in rs], dtype=torch.float64)
            row[key] = vals.mean().item()
            row[key + "_std"] = vals.std().item() if len(rs) > 1 else 0.0
        out.append(row)
    return out


def format_table(rows: list[dict], args) -> str:
    pm = len(args.seeds) > 1
    lines = [
        f"digits: {args.n_train} train / {args.n_test} test images, {args.epochs} epoch{'s' * (args.epochs != 1)}, "
        f"batch {args.batch_size}, "
        f"seeds {','.join(map(str, args.seeds))}, rho {args.rho}, label noise {args.label_noise}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)" + (", mean ± std over seeds" if pm else ""),
        "",
        "| optimizer | test accuracy | test loss | seconds / epoch |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [
            f"{r[k]:.{d}f}" + (f" ± {r[k + '_std']:.{d}f}" if pm else "")
            for k, d in (("acc", 4), ("loss", 4), ("sec_per_epoch", 3))
        ]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUICK_EPOCHS, QUICK_SEEDS, QUICK_TRAIN_IMAGES = 2, [0], 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=30, help="training epochs per method and seed")
    p.add_argument("--batch-size", type=int, default=64, help="training images per step")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--rho", type=float, default=0.05, help="SAM/BiSAM perturbation radius")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the training loss")
    p.add_argument("--label-noise", type=float, default=0.0, help="fraction of training labels replaced at random")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="initialisation and batch-order seeds")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split")
    p.add_argument(
        "--methods",
        nargs="+",
        type=str.lower,  # applied before the choices are checked, so any case is accepted
        default=list(METHODS),
        choices=list(METHODS),
        metavar="METHOD",
        help=f"optimizers to compare, any of: {', '.join(METHODS)} (case-insensitive)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"CI smoke test: {QUICK_TRAIN_IMAGES} training images, {QUICK_EPOCHS} epochs, seed {QUICK_SEEDS[0]} "
        "(an explicit --epochs or --seeds wins)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this tiny CNN)")
    args = p.parse_args(argv)
    if args.quick:  # parsed again with quick defaults, so that explicit --epochs and --seeds still win
        p.set_defaults(epochs=QUICK_EPOCHS, seeds=QUICK_SEEDS)
        args = p.parse_args(argv)
    args.methods = list(dict.fromkeys(args.methods))  # "sgd SGD" names one method: train it once
    return args


def framework_example_parser(description: str) -> argparse.ArgumentParser:
    """The options of the one-run framework examples (lightning_digits.py, hf_trainer_digits.py); each adds
    its precision option and parses with :func:`parse_framework_example_args`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="training images per step")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the schedule")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--rho", type=float, default=0.05, help="BiSAM perturbation radius")
    p.add_argument("--ascent-loss", default="log", choices=["log", "tanh", "cross_entropy"],
                   help="pass-1 loss: BiSAM's lower bound (log, tanh) or cross_entropy (SAM)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the training loss")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    p.add_argument("--quick", action="store_true", help=f"CI smoke test: {QUICK_TRAIN_IMAGES} training images, "
                                                        f"{QUICK_EPOCHS} epochs (an explicit --epochs wins)")
    return p


def framework_example_data(args: argparse.Namespace):
    """(x_train, y_train, x_test, y_test) of the framework examples: the split of seed 0, fewer training images
    with --quick."""
    x_train, y_train, x_test, y_test = load_digits_tensors(0)
    if args.quick:
        x_train, y_train = x_train[:QUICK_TRAIN_IMAGES], y_train[:QUICK_TRAIN_IMAGES]
    return x_train, y_train, x_test, y_test


def parse_framework_example_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.quick:  # parsed again with the quick default, so that an explicit --epochs still wins
        parser.set_defaults(epochs=QUICK_EPOCHS)
        args = parser.parse_args(argv)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits_tensors(args.split_seed, label_noise=args.label_noise)
    if args.quick:
        data = (data[0][:QUICK_TRAIN_IMAGES], data[1][:QUICK_TRAIN_IMAGES], *data[2:])
    args.n_train, args.n_test = len(data[1]), len(data[3])
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        init = make_model()  # one initialisation per seed, shared by every method
        runs += [train(m, init, data, args, seed) for m in args.methods]
    rows = summarise(runs)
    print(format_table(rows, args))
    return rows


if __name__ == "__main__":
    main()
