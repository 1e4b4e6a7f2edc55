"""Model zoo and flat-parameter helpers.

Strategies, clipping and noise work on one flat ``float32`` vector per model; these helpers move
between that vector and a ``torch.nn.Module``. Models are small by design (the simulator trains
thousands of them per round); a user model is any module built by a registered builder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedsim.registry import Registry

ModelBuilder = Callable[..., nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")


def _logreg(num_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(num_features, num_classes))


def _mlp(num_features: int, num_classes: int, hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


MODELS.register("logreg", _logreg)
MODELS.register("mlp", _mlp)


def build_model(
    name: str, *, num_features: int, num_classes: int, hidden: int = 64, seed: int = 0
) -> nn.Module:
    """Build a registered model with parameters initialised from ``seed`` (no global RNG)."""
    builder = MODELS.get(name)
    kwargs = {"hidden": hidden} if name == "mlp" else {}
    model = builder(num_features, num_classes, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features**0.5
                module.weight.uniform_(-bound, bound, generator=gen)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=gen)
    return model


def get_flat(model: nn.Module) -> torch.Tensor:
    """All parameters as one new flat ``float32`` vector."""
    return nn.utils.parameters_to_vector(model.parameters()).detach().clone().float()


def set_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the model's parameters (in place).

    The values are copied, never aliased: training the model afterwards must not modify ``flat``
    (``nn.utils.vector_to_parameters`` would make the parameters views of ``flat``).
    """
    expected = num_params(model)
    if flat.dim() != 1 or flat.numel() != expected:
        raise ValueError(f"flat parameters have shape {tuple(flat.shape)}, model needs ({expected},)")
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            k = p.numel()
            p.copy_(flat[offset : offset + k].view_as(p))
            offset += k


def num_params(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())
