"""Classification heads: on a backbone's pooled features (linear, mlp), or pooling its feature map
themselves (gap, attention)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from hydra.utils import get_class

from transferlab.errors import ConfigError


class LinearHead(nn.Sequential):
    """Dropout (optional) then one linear layer: the standard fine-tuning head."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(), nn.Linear(in_features, num_classes)
        )


class MLPHead(nn.Sequential):
    """Linear -> ReLU -> Dropout -> Linear, like the Dense(256)/Dense(1024) heads of Keras recipes."""

    def __init__(
        self, in_features: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.5
    ) -> None:
        super().__init__(
            nn.Linear(in_features, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )


# Pooling heads: they take the backbone's unpooled tokens (B, positions, channels) (`backbones.feature_maps`)
# and pool them themselves; `POOLS_FEATURE_MAP` tells the model to build its backbone that way.


class GlobalAvgPoolHead(nn.Module):
    """The mean over all positions (a CNN's global average pooling; a ViT's mean patch token), then
    dropout and one linear layer."""

    POOLS_FEATURE_MAP = True

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.classifier = LinearHead(in_features, num_classes, dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(tokens.mean(dim=1))


class AttentionPoolHead(nn.Module):
    """A learned query per attention head attends over the positions: each head's weights are a softmax
    over positions of query . key(position); the pooled features are the weighted sum of the (normed)
    tokens, one channel slice per head, then dropout and one linear layer.

    The query starts near zero, so the weights start near uniform: training begins from global average
    pooling and learns where to look.
    """

    POOLS_FEATURE_MAP = True

    def __init__(self, in_features: int, num_classes: int, num_heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if in_features % num_heads:
            raise ConfigError(f"head.num_heads={num_heads} must divide the backbone's {in_features} channels")
        self.num_heads, self.head_dim = num_heads, in_features // num_heads
        self.norm = nn.LayerNorm(in_features)
        self.key = nn.Linear(in_features, in_features)
        self.query = nn.Parameter(torch.randn(num_heads, self.head_dim) * 0.02)
        self.classifier = LinearHead(in_features, num_classes, dropout)

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """Weights (B, heads, positions), each row summing to 1 over positions."""
        batch, positions, _ = tokens.shape
        keys = self.key(self.norm(tokens)).view(batch, positions, self.num_heads, self.head_dim)
        # products and sums, not einsum: plain ops trace through export and torch-pruning alike
        scores = (keys * self.query).sum(dim=-1) / math.sqrt(self.head_dim)  # (B, positions, heads)
        return scores.transpose(1, 2).softmax(dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, positions, channels = tokens.shape
        weights = self.attention(tokens)
        values = self.norm(tokens).view(batch, positions, self.num_heads, self.head_dim)
        pooled = (weights.transpose(1, 2).unsqueeze(-1) * values).sum(dim=1).reshape(batch, channels)
        return self.classifier(pooled)


def pools_feature_map(head_target: str) -> bool:
    """Whether the head of `head._target_` takes the unpooled tokens."""
    return bool(getattr(get_class(head_target), "POOLS_FEATURE_MAP", False))
