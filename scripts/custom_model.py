"""A user model for fedsim: ``[model] name = "../scripts/custom_model.py:build"``.

fedsim calls ``build(spec, **params)`` with the dataset's :class:`fedsim.data.DataSpec` and the
other ``[model]`` keys (here ``width`` and ``depth``, kebab-case in the scenario), and trains the
returned module. Any ``nn.Module`` works; this one is a small residual MLP with LayerNorm and Tanh.
The builder owns the initialisation: it takes no ``generator`` argument, so fedsim runs it with
torch's global generator seeded from the run's seed (restored afterwards), and PyTorch's own
initialisation of these layers is reproducible; fedsim never re-draws what ``build`` returns (a
builder may load pretrained weights). Declare ``generator: torch.Generator`` to draw from fedsim's
seeded generator yourself.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsim.data import DataSpec


class ResidualMLP(nn.Module):
    """Input projection, ``depth`` residual blocks ``x + W2 tanh(W1 LN(x))``, output layer."""

    def __init__(self, num_features: int, num_classes: int, width: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(num_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
            for _ in range(depth)
        )
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def build(spec: DataSpec, width: int = 32, depth: int = 2) -> nn.Module:
    """The model for a classification dataset ``spec``."""
    if spec.task != "classification":
        raise ValueError(f"ResidualMLP classifies; the dataset's task is {spec.task!r}")
    return ResidualMLP(spec.num_features, spec.num_classes, width, depth)
