"""Classification heads put on top of a backbone's pooled features."""

from __future__ import annotations

import torch.nn as nn


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
