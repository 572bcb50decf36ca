"""BiSAM in a Hugging Face Trainer on scikit-learn's bundled handwritten digits (no download).

``BiSAMTrainer`` (bisam_kernels.integrations.huggingface) is a ``transformers.Trainer`` whose training
step is ``bk.bisam_step``; the Trainer brings the epochs, its optimizer (SGD with Nesterov momentum here,
wrapped in BiSAM), its linear LR schedule and ``bf16=True`` AMP. The same small CNN (with BatchNorm, frozen
in pass 2) and data as examples/train_digits.py.

    python examples/hf_trainer_digits.py            # 30 epochs (13 s of CPU time on the 2-core development machine)
    python examples/hf_trainer_digits.py --quick    # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.nn as nn
import transformers

from bisam_kernels.integrations.huggingface import BiSAMTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_digits as digits  # noqa: E402  (the data, the model, the evaluation, the options)


class DigitsModel(nn.Module):
    """The Trainer passes the batch's fields by name; the logits come back under "logits"."""

    def __init__(self):
        super().__init__()
        self.net = digits.make_model()

    def forward(self, pixel_values, labels=None):
        return {"logits": self.net(pixel_values)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = digits.framework_example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--bf16", action="store_true", help="the Trainer's bf16 autocast")
    return digits.parse_framework_example_args(parser, argv)


def main(argv=None) -> float:
    args = parse_args(argv)
    torch.set_num_threads(1)  # fastest for this tiny CNN
    transformers.set_seed(args.seed)
    x_train, y_train, x_test, y_test = digits.framework_example_data(args)
    train = [{"pixel_values": x, "labels": y} for x, y in zip(x_train, y_train)]
    model = DigitsModel()
    with tempfile.TemporaryDirectory() as output_dir:
        settings = transformers.TrainingArguments(
            output_dir=output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, weight_decay=args.weight_decay, lr_scheduler_type="linear", warmup_steps=0.1,
            max_grad_norm=0.0, bf16=args.bf16, use_cpu=True,
            save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=args.quick, seed=args.seed,
        )
        trainer = BiSAMTrainer(
            model=model, args=settings, train_dataset=train, rho=args.rho, ascent_loss=args.ascent_loss,
            label_smoothing=args.label_smoothing,  # TrainingArguments' label_smoothing_factor needs a PreTrainedModel
            optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": args.lr, "momentum": 0.9, "nesterov": True}),
        )
        trainer.train()
    accuracy, loss = digits.evaluate(model.net, x_test, y_test)
    print(f"hf trainer digits: {len(y_train)} train / {len(y_test)} test images, {args.epochs} epochs, "
          f"BiSAM({args.ascent_loss}), {'bf16' if args.bf16 else 'fp32'}: test accuracy {accuracy:.4f}, "
          f"test loss {loss:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
