"""BiSAM in a Lightning Trainer on scikit-learn's bundled handwritten digits (no download).

The model is a ``BiSAMModule`` (bisam_kernels.integrations.lightning): its training step is
``bk.bisam_step``; the Trainer brings the epochs, the LR schedule (one-cycle, stepped per step), the
precision plugin and the strategy. The same small CNN and data as examples/train_digits.py.

    python examples/lightning_digits.py            # 30 epochs (13 s on the 2-core development machine)
    python examples/lightning_digits.py --quick    # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import bisam_kernels as bk
from bisam_kernels.integrations.lightning import BiSAMModule

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_digits as digits  # noqa: E402  (the data, the model, the evaluation, the options)


class DigitsClassifier(BiSAMModule):
    def __init__(self, args: argparse.Namespace, steps_per_epoch: int):
        super().__init__(ascent_loss=args.ascent_loss, label_smoothing=args.label_smoothing)
        self.net = digits.make_model()
        self.args, self.steps_per_epoch = args, steps_per_epoch

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        a = self.args
        opt = bk.BiSAM(self.parameters(), torch.optim.SGD, rho=a.rho, lr=a.lr, momentum=0.9,
                       weight_decay=a.weight_decay, nesterov=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.epochs * self.steps_per_epoch,
                                                    pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = digits.framework_example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="32-true", help="the Trainer's precision (32-true, bf16-mixed, ...)")
    return digits.parse_framework_example_args(parser, argv)


def main(argv=None) -> float:
    args = parse_args(argv)
    torch.set_num_threads(1)  # fastest for this tiny CNN
    L.seed_everything(args.seed, verbose=False)
    x_train, y_train, x_test, y_test = digits.framework_example_data(args)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True)
    model = DigitsClassifier(args, math.ceil(len(y_train) / args.batch_size))
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, precision=args.precision,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=not args.quick)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, loader)
    accuracy, loss = digits.evaluate(model.net, x_test, y_test)
    print(f"lightning digits: {len(y_train)} train / {len(y_test)} test images, {args.epochs} epochs, "
          f"BiSAM({args.ascent_loss}), precision {trainer.precision}: test accuracy {accuracy:.4f}, test loss {loss:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
