"""Built-in sample architectures (trusted model code), trained in ``sample_models/``.

Every input is a digits image batch of shape (N, 1, 8, 8), pixel values scaled to [0, 1], so one
``--data`` file serves all three models. Layer sizes are read from the weights at run time where
structured pruning can change them, so a pruned checkpoint runs through the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class DigitsMLP(nn.Module):
    """64 -> hidden... -> 10 multilayer perceptron."""

    def __init__(self, hidden: tuple[int, ...] | list[int] = (256, 128), num_classes: int = 10, in_features: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 8, 8) -> (N, 10)
        return self.net(x)


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks with pooling, then a two-layer classifier head."""

    def __init__(self, channels: tuple[int, ...] | list[int] = (32, 64, 128), hidden: int = 128, num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(c2, c3, 3, padding=1, bias=False),
            nn.BatchNorm2d(c3),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c3 * 4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 8, 8) -> (N, 10)
        return self.classifier(self.features(x))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer with explicit q/k/v/o projections (prunable per head)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        b, t, _ = x.shape
        h = self.norm1(x)
        # Heads = projected width / head_dim, read from the weights so pruned heads still run.
        heads = self.q.out_features // self.head_dim
        q, k, v = (p(h).view(b, t, heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, H, T, D)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsTransformer(nn.Module):
    """Reads the 8x8 image as a sequence of 8 row tokens; mean-pools the encoder output."""

    def __init__(
        self, dim: int = 64, heads: int = 4, ffn: int = 128, layers: int = 2, num_classes: int = 10, seq_len: int = 8, token_dim: int = 8
    ):
        super().__init__()
        self.embed = nn.Linear(token_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.pos, std=1 / math.sqrt(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 8, 8) -> (N, 10)
        x = self.embed(x.reshape(x.shape[0], -1, self.embed.in_features)) + self.pos  # (B, T, C)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=1))


@dataclass(frozen=True)
class ZooEntry:
    """A built-in model: how to build it and what one input looks like."""

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # one sample, without the batch dimension


MODELS: dict[str, ZooEntry] = {
    "digits-mlp": ZooEntry(DigitsMLP, (1, 8, 8)),
    "digits-cnn": ZooEntry(DigitsCNN, (1, 8, 8)),
    "digits-transformer": ZooEntry(DigitsTransformer, (1, 8, 8)),
}
