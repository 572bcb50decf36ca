"""Models and parameter-shape sets for the benchmarks, built without downloads.

- ``resnet56_cifar(num_classes=10)``: the CIFAR ResNet-56 of He et al. (2016, section 4.2), 3 stages of
  9 basic blocks at 16/32/64 channels, parameter-free "option A" shortcuts (strided subsampling and zero
  padding of the channels), convolutions without bias: 167 parameter tensors, 0.85M parameters (10 classes).
- ``resnet56_param_shapes(num_classes=10)``: the shapes of its parameters, in ``parameters()`` order.
- ``vit_b16_param_shapes(num_classes=1000, image_size=224)``: the shapes of ViT-B/16's parameters in the
  timm / torchvision layout (patch embedding, class token, position embedding, 12 pre-norm blocks, final
  norm, head): 152 tensors, 86.6M parameters at 224x224 with 1000 classes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "resnet56_cifar",
    "resnet56_param_shapes",
    "vit_b16_param_shapes",
    "wrn28_10_param_shapes",
    "gpt2_small_param_shapes",
    "decoder_1b_param_shapes",
    "count_params",
]


class _ShortcutA(nn.Module):
    """Option A shortcut: take every other pixel and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = (
            _ShortcutA(in_planes, planes, stride) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for stage, planes in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet56_cifar(num_classes: int = 10) -> ResNetCIFAR:
    """ResNet-56 for 32x32 inputs (6n+2 layers with n = 9)."""
    return ResNetCIFAR(9, num_classes)


def resnet56_param_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    """Shapes of ResNet-56's parameters, in ``model.parameters()`` order (built on the meta device)."""
    with torch.device("meta"):
        model = resnet56_cifar(num_classes)
    return [tuple(p.shape) for p in model.parameters()]


def vit_b16_param_shapes(num_classes: int = 1000, image_size: int = 224) -> list[tuple[int, ...]]:
    """Shapes of ViT-B/16's parameters (patch 16, width 768, depth 12, MLP 3072, qkv with bias)."""
    patch, dim, depth, mlp = 16, 768, 12, 3072
    tokens = (image_size // patch) ** 2 + 1
    shapes: list[tuple[int, ...]] = [
        (dim, 3, patch, patch),  # patch embedding conv weight
        (dim,),  # patch embedding conv bias
        (1, 1, dim),  # class token
        (1, tokens, dim),  # position embedding
    ]
    for _ in range(depth):
        shapes += [
            (dim,), (dim,),  # norm1
            (3 * dim, dim), (3 * dim,),  # attention qkv
            (dim, dim), (dim,),  # attention output projection
            (dim,), (dim,),  # norm2
            (mlp, dim), (mlp,),  # MLP fc1
            (dim, mlp), (dim,),  # MLP fc2
        ]  # fmt: skip
    shapes += [(dim,), (dim,), (num_classes, dim), (num_classes,)]  # final norm, head
    return shapes


def wrn28_10_param_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    """WRN-28-10 for CIFAR (Zagoruyko & Komodakis, 2016): 3 groups of 4 pre-activation blocks at
    160/320/640 channels, 1x1 projection shortcuts where the width changes: 36.5M parameters."""
    shapes: list[tuple[int, ...]] = [(16, 3, 3, 3)]
    in_ch = 16
    for out_ch in (160, 320, 640):
        for _ in range(4):
            shapes += [(in_ch,), (in_ch,), (out_ch, in_ch, 3, 3), (out_ch,), (out_ch,), (out_ch, out_ch, 3, 3)]
            if in_ch != out_ch:
                shapes.append((out_ch, in_ch, 1, 1))
            in_ch = out_ch
    return shapes + [(in_ch,), (in_ch,), (num_classes, in_ch), (num_classes,)]


def gpt2_small_param_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124M parameters, 148 tensors; the output head is tied to the token embedding)."""
    dim, depth, vocab, context = 768, 12, 50257, 1024
    shapes: list[tuple[int, ...]] = [(vocab, dim), (context, dim)]
    for _ in range(depth):
        shapes += [
            (dim,), (dim,),  # ln_1
            (dim, 3 * dim), (3 * dim,),  # attention c_attn
            (dim, dim), (dim,),  # attention c_proj
            (dim,), (dim,),  # ln_2
            (dim, 4 * dim), (4 * dim,),  # mlp c_fc
            (4 * dim, dim), (dim,),  # mlp c_proj
        ]  # fmt: skip
    return shapes + [(dim,), (dim,)]


def decoder_1b_param_shapes() -> list[tuple[int, ...]]:
    """A Llama-style 1.1B decoder (the TinyLlama shape: width 2048, 22 layers, grouped-query attention
    with 4 key/value heads of 64, SwiGLU MLP of 5632, vocabulary 32000, untied head): 201 tensors."""
    dim, depth, kv_dim, ffn, vocab = 2048, 22, 256, 5632, 32000
    shapes: list[tuple[int, ...]] = [(vocab, dim)]
    for _ in range(depth):
        shapes += [
            (dim,),  # attention norm
            (dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, dim),  # q, k, v, o
            (dim,),  # MLP norm
            (ffn, dim), (ffn, dim), (dim, ffn),  # gate, up, down
        ]  # fmt: skip
    return shapes + [(dim,), (vocab, dim)]


def count_params(shapes) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total
