"""AdamW vs SAM vs BiSAM on a small character-level transformer, trained on Python's own standard-library
source (text that ships with Python: no download), through the fused linear losses.

The model returns hidden states; its output projection (``head``) is never applied to build logits:
every loss goes through ``bk.fused_linear_cross_entropy`` (AdamW; pass 2 of SAM and BiSAM) and
``bk.fused_linear_bisam_loss`` (pass 1 of BiSAM), with ``bk.bisam_step(..., head=model.head)``. Every
method starts from the same initialisation and sees the same batches; SAM and BiSAM wrap AdamW.
The table gives the validation loss in bits per character and the training seconds per step.

    python examples/train_char_lm.py            # the full comparison (about a minute on 2 CPU cores)
    python examples/train_char_lm.py --quick    # seconds, for CI
    python examples/train_char_lm.py --help     # every option, with its default
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn as nn

import bisam_kernels as bk

# Modules of the standard library whose source is the corpus (present in every CPython 3.10+).
CORPUS_MODULES = ("textwrap", "string", "functools", "argparse", "dataclasses", "enum", "inspect", "typing")
METHODS = {"adamw": ("AdamW", None), "sam": ("SAM", "cross_entropy"), "bisam": ("BiSAM (log)", "log")}


def load_corpus(max_chars: int) -> str:
    """The source of CORPUS_MODULES, concatenated (read from the running Python's library directory)."""
    libdir = os.path.dirname(os.__file__)
    parts = []
    for name in CORPUS_MODULES:
        with open(os.path.join(libdir, name + ".py"), encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)[:max_chars]


class CharTransformer(nn.Module):
    """Token + position embeddings, pre-norm causal transformer layers; returns hidden states. ``head`` is
    the output projection, applied by the fused losses only."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        h = self.embed(x) + self.position[:T]
        return self.norm(self.blocks(h, mask=self.causal[:T, :T], is_causal=True))


def batches(data: torch.Tensor, context: int, batch: int, steps: int, seed: int):
    """(inputs, next characters) windows at random offsets, the same sequence for every method."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        window = torch.stack([data[s: s + context + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def validation_bits(model: CharTransformer, data: torch.Tensor, context: int) -> float:
    """Mean cross-entropy over non-overlapping windows of the held-out text, in bits per character."""
    model.eval()
    n = (len(data) - 1) // context
    x = data[: n * context].view(n, context)
    y = data[1: n * context + 1].view(n, context)
    loss = bk.fused_linear_cross_entropy(model(x), model.head.weight, y)
    model.train()
    return loss.item() / math.log(2)


def train(method: str, model: CharTransformer, train_data, args) -> tuple[float, float]:
    """Trains in place; returns (final training loss in nats, seconds per step)."""
    _, ascent = METHODS[method]
    adamw_kw = dict(lr=args.lr, weight_decay=0.01)
    if ascent is None:
        opt = torch.optim.AdamW(model.parameters(), **adamw_kw)
    else:
        opt = bk.BiSAM(model.parameters(), torch.optim.AdamW, rho=args.rho, **adamw_kw)
    start, loss = None, float("nan")
    for step, (x, y) in enumerate(batches(train_data, args.context, args.batch, args.steps, args.seed)):
        if step == 1:  # the first step (allocations, warm-up) is not timed
            start = time.perf_counter()
        if ascent is None:
            opt.zero_grad()
            out = bk.fused_linear_cross_entropy(model(x), model.head.weight, y)
            out.backward()
            opt.step()
            loss = out.item()
        else:
            result = bk.bisam_step(model, opt, x, y, head=model.head, ascent_loss=ascent, mu=args.mu,
                                   label_smoothing=0.0)
            loss = result.loss.item()
    return loss, (time.perf_counter() - start) / (args.steps - 1) if args.steps > 1 else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 steps of batch 8 on a 40,000-character corpus, for "
                        "CI (an explicit --steps, --batch or --max-chars wins)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="methods to compare, from the same initialisation")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per method")
    parser.add_argument("--batch", type=int, default=16, help="windows per step")
    parser.add_argument("--context", type=int, default=64, help="characters per window")
    parser.add_argument("--width", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (also the base of SAM / BiSAM)")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM / BiSAM radius")
    parser.add_argument("--mu", type=float, default=1.0, help="BiSAM's softmax temperature")
    parser.add_argument("--max-chars", type=int, default=400_000, help="corpus size in characters")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    args = parser.parse_args(argv)
    if args.quick:  # parsed again with the quick defaults, so that explicit options still win
        parser.set_defaults(steps=5, max_chars=40_000, batch=8)
        args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    torch.manual_seed(args.seed)
    text = load_corpus(args.max_chars)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    init = CharTransformer(len(chars), args.context, args.width, args.layers, heads=4)
    print(f"corpus: {len(text)} characters of the standard library's source ({', '.join(CORPUS_MODULES)}), "
          f"{len(chars)} distinct; {sum(p.numel() for p in init.parameters())} parameters; {args.steps} steps "
          f"of {args.batch}x{args.context} characters")
    print("val bits/char: cross-entropy on the held-out 10% at the trained weights, in bits; train loss: the last "
          "step's, in nats (for SAM / BiSAM at the perturbed weights w + e); s/step: after the first step")
    print(f"{'method':12} {'val bits/char':>14} {'train loss':>11} {'s/step':>8}")
    for method in args.methods:
        model = copy.deepcopy(init)
        loss, per_step = train(method, model, train_data, args)
        bits = validation_bits(model, val_data, args.context)
        print(f"{METHODS[method][0]:12} {bits:14.3f} {loss:11.3f} {per_step:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
