"""Example-level DP on the device: local training with DP-SGD (Opacus).

DP-SGD (Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with Differential
Privacy", CCS 2016) as implemented by Opacus (Yousefpour et al., "Opacus: User-Friendly
Differential Privacy Library in PyTorch", 2021): every local step samples each local example
independently with probability ``q = 1 / ceil(n / batch_size)`` (Poisson sampling), clips every
per-example gradient to L2 norm ``max_grad_norm``, adds ``N(0, (z * max_grad_norm)**2 I)`` to their
sum and divides by the expected batch size. The final model delta is still clipped to the round's
``clip_norm`` so the server-side, user-level mechanism (DP-FedAvg, DP-FTRL) keeps its guarantee.

Two different guarantees
------------------------
* **User level** (the strategy's ``rho`` / ``epsilon`` in ``summary.json``): adding or removing
  *all* the data of one device changes the distribution of the released models little. It comes
  from clipping the device's whole update and the server's noise.
* **Example level** (``summary.json["example_level"]``, this trainer): adding or removing *one
  training example* of a device changes the distribution of that device's *reports* little, even
  to an adversary who sees every report the device sends (no trust in the server's noise). It is
  the RDP accountant of Opacus (Mironov 2017; Mironov, Talwar, Zhang 2019) over all local steps a
  device can take: steps per participation times the number of participations (the configured
  ``max_participations``, else the most any device actually made in this run), converted to
  ``(epsilon, delta)``; the worst device is reported.

Neither implies the other in a useful way: example-level DP says nothing about a user who
contributes many similar examples, and user-level DP does not protect single examples against
someone who sees an individual device's reports.

Randomness: the example sampling and the DP-SGD noise are what example-level DP rests on, so they
never come from the server's task seed (the server could regenerate the noise and recover the
clipped gradient sum). On a device (Flower ClientApp) both generator seeds are drawn from the
operating system's secure source (:mod:`secrets`, 64 bits each) for every task; in simulation the
engine hands the trainer the run's secret noise source (:meth:`OpacusTrainer.set_private_source`)
and the seeds come from its stream ``(TAG_CLIENT, round, device)``, so a resumed run replays them.
The generators themselves are torch's (Opacus's non-secure mode): their 64-bit seeds are secret,
but they are not cryptographic generators.
"""

from __future__ import annotations

import copy
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedsim.client import ClientResult, ClientTrainer
from fedsim.models import get_flat, set_flat
from fedsim.privacy.clipping import clip_by_norm
from fedsim.registry import resolve_params
from fedsim.types import ClientTask, TrainConfig
from fedsim.validation import int_at_least, number_in, positive_number

__all__ = ["OpacusParams", "OpacusTrainer", "example_level_epsilon"]


def example_level_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """``epsilon`` of ``steps`` DP-SGD steps at ``sampling_rate`` (Opacus RDP accountant)."""
    if steps == 0:
        return 0.0
    from opacus.accountants import RDPAccountant  # Opacus is imported only when used (~3 s)

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sampling_rate), int(steps))]
    return float(accountant.get_epsilon(delta=delta))


def local_schedule(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """``(sampling rate, steps per participation)`` of one device, as Opacus sets them up."""
    batches = math.ceil(num_examples / min(batch_size, num_examples))
    return 1.0 / batches, local_epochs * batches


def _batches(loader: DataLoader, epochs: int):
    for _ in range(epochs):
        yield from loader


@dataclass(frozen=True)
class OpacusParams:
    """``[client] trainer = "opacus"`` parameters (kebab-case in a scenario).

    Attributes
    ----------
    noise_multiplier:
        DP-SGD noise multiplier ``z`` of each local step.
    max_grad_norm:
        Per-example gradient clip bound.
    target_delta:
        ``delta`` of the reported example-level ``(epsilon, delta)``; ``None`` (default): the
        scenario's ``[privacy] delta``, the one the user-level figures use.
    max_participations:
        Participations per device to account for; ``None``: the most any device made in the run.
    """

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_delta: float | None = None
    max_participations: int | None = None

    def __post_init__(self) -> None:
        positive_number("noise-multiplier", self.noise_multiplier)
        positive_number("max-grad-norm", self.max_grad_norm)
        if self.target_delta is not None:
            number_in("target-delta", self.target_delta, 0.0, 1.0, low_open=True, high_open=True)
        int_at_least("max-participations", self.max_participations, 1, optional=True)


class OpacusTrainer(ClientTrainer):
    """Local DP-SGD with Opacus, Poisson sampling of examples; the delta is clipped afterwards.

    ``model`` is the template module (copied for every client); the parameters are an
    :class:`OpacusParams` or its fields as keywords (``OpacusTrainer(model, noise_multiplier=1.1)``).
    """

    Params = OpacusParams

    def __init__(self, model: nn.Module, params: OpacusParams | None = None, /, **kwargs: Any) -> None:
        super().__init__(model)
        self.params = p = resolve_params(OpacusParams, params, kwargs)
        self.noise_multiplier = float(p.noise_multiplier)
        self.max_grad_norm = float(p.max_grad_norm)
        self.target_delta = None if p.target_delta is None else float(p.target_delta)
        self.max_participations = p.max_participations
        # per device: (sampling rate, steps per participation) and participations so far
        self._schedule: dict[int, tuple[float, int]] = {}
        self._participations: dict[int, int] = {}
        self._private: Any | None = None

    def set_private_source(self, source: Any) -> None:
        """Draw the DP-SGD seeds from ``source`` (a :class:`~fedsim.privacy.noise.NoiseSource`).

        Without one (a device), every task draws them from :mod:`secrets`.
        """
        self._private = source

    def _private_seeds(self, task: ClientTask, config: TrainConfig) -> tuple[int, int]:
        """Seeds of the example sampler and the DP-SGD noise: secret, never the task seed."""
        if self._private is None:
            return secrets.randbits(63), secrets.randbits(63)
        from fedsim.privacy.noise import TAG_CLIENT

        words = self._private.uniform((TAG_CLIENT, int(config.round), int(task.device_id)), 2)
        return int(words[0] * 2.0**53), int(words[1] * 2.0**53)

    def train_client(self, params: torch.Tensor, task: ClientTask, config: TrainConfig) -> ClientResult:
        if self.objective is not None and self.objective.kind != "classification":
            raise ValueError(f"the opacus trainer trains classification models, the dataset's task is {self.objective.kind!r}")
        n = task.num_examples
        if n == 0:
            return ClientResult(torch.zeros_like(params), 0, 0.0)
        model = copy.deepcopy(self.model)
        set_flat(model, params)
        model.train()
        sample_seed, noise_seed = self._private_seeds(task, config)
        loader = DataLoader(
            TensorDataset(task.x, task.y),
            batch_size=min(config.batch_size, n),
            generator=torch.Generator().manual_seed(int(sample_seed)),
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
        from opacus import PrivacyEngine  # imported only when this trainer trains (~3 s)

        with warnings.catch_warnings():
            # secretly seeded torch generators (not Opacus's secure mode); see the module docstring
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG turned off.*")
            engine = PrivacyEngine(accountant="rdp")
            module, dp_optimizer, dp_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                poisson_sampling=True,
                noise_generator=torch.Generator().manual_seed(int(noise_seed)),
            )
        total_loss, total_examples = 0.0, 0
        with warnings.catch_warnings():
            # Opacus's per-example hooks fire on module outputs (inputs need no gradient): benign
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            for x, y in _batches(dp_loader, config.local_epochs):
                dp_optimizer.zero_grad(set_to_none=True)
                # mean over the sampled examples: Opacus recovers per-example gradients, clips
                # them, adds noise to their sum and divides by the *expected* batch size
                logits = module(x)
                loss = F.cross_entropy(logits, y, reduction="mean") if len(y) else logits.sum() * 0.0
                loss.backward()
                dp_optimizer.step()  # a step with an empty batch still adds noise
                total_loss += float(loss.detach()) * len(y)
                total_examples += len(y)
        flat = get_flat(model)
        delta = flat - params
        if config.clip_norm is not None:
            delta = clip_by_norm(delta, config.clip_norm)
        dev = task.device_id
        self._schedule[dev] = local_schedule(n, config.batch_size, config.local_epochs)
        self._participations[dev] = self._participations.get(dev, 0) + 1
        return ClientResult(delta.contiguous(), n, total_loss / max(total_examples, 1))

    def example_privacy(self, *, delta: float | None = None) -> dict[str, Any] | None:
        """Worst-device example-level ``(epsilon, delta)`` over all local steps a device can take.

        The delta is ``target-delta`` when set, else ``delta`` (the scenario's), else ``1e-6``.
        """
        if not self._schedule:
            return None
        target = self.target_delta if self.target_delta is not None else (delta if delta is not None else 1e-6)
        observed = max(self._participations.values())
        k = self.max_participations if self.max_participations is not None else observed
        cache: dict[tuple[float, int], float] = {}
        worst: tuple[float, float, int] = (-1.0, 0.0, 0)
        for rate, steps_per in self._schedule.values():
            key = (rate, steps_per * k)
            if key not in cache:
                cache[key] = example_level_epsilon(self.noise_multiplier, rate, steps_per * k, target)
            if cache[key] > worst[0]:
                worst = (cache[key], rate, steps_per * k)
        return {
            "epsilon": worst[0],
            "delta": target,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sampling_rate": worst[1],
            "local_steps": worst[2],
            "max_participations": k,
            "participations_basis": "configured" if self.max_participations is not None else "observed",
            "accountant": "opacus-rdp",
            "unit": "example",
        }
