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
  device can take: steps per participation times the number of participations, converted to
  ``(epsilon, delta)``. A device of ``n`` examples takes ``batches = ceil(n / batch_size)`` steps
  per epoch at sampling rate ``1 / batches``, so the exact figure of a run's worst device reveals
  the size of its smallest device: the published figure (:meth:`OpacusTrainer.example_privacy`)
  is the worst case over *every* device size, with a participation count the scenario fixes
  (the configured ``max_participations``, else the strategy's limit, else one per round); the
  figure of the devices that actually trained (:meth:`OpacusTrainer.observed_example_privacy`)
  goes to ``private/summary.json`` in a DP run.

Neither implies the other in a useful way: example-level DP says nothing about a user who
contributes many similar examples, and user-level DP does not protect single examples against
someone who sees an individual device's reports.

Randomness: the example sampling and the DP-SGD noise are what example-level DP rests on. The
adversary of example-level DP is whoever sees a device's reports, the server included, so neither
may be predictable from anything the server knows or sends (the task seed, the round, the device
id) and neither may pass through a seeded ``torch.Generator`` (``manual_seed`` keeps 32 bits of
its seed for CPU generators: a server that enumerates them regenerates the noise and recovers the
clipped gradient sum). Both come from the project's cryptographic sampler
(:class:`~fedsim.privacy.noise.NoiseSource`: AES-128-CTR under an HMAC-derived key, Gaussians
summed from four polar-method draws on 53-bit uniforms; :mod:`fedsim.privacy.csprng`):

* on a device (a Flower ClientApp) every task draws a fresh 256-bit
  :class:`~fedsim.privacy.noise.NoiseKey` from :mod:`secrets`, used for that task only and never
  stored or sent, so two tasks with the same inputs draw independent noise;
* in simulation the engine hands the trainer the run's secret noise source
  (:meth:`OpacusTrainer.set_private_source`) and the streams are
  ``(TAG_CLIENT, round, device, use, step)`` (``use`` 0: the Poisson sample of step ``step``,
  1: its noise), so a resumed run replays exactly the noise of the run it continues.

Opacus's own noise (``DPOptimizer.add_noise``) and Poisson sampler draw from torch generators;
Opacus's ``secure_mode`` would need ``torchcsprng``, whose last release (0.2.1, 2021) has no
distribution for current Python and torch (pip finds none). So the trainer builds the DP-SGD
pieces itself: Opacus's ``GradSampleModule`` (per-example gradients) and ``DPOptimizer``
(per-example clipping to ``max_grad_norm``, summation, division by the expected batch size
``floor(n / batches)``), with a subclass whose ``add_noise`` adds
``N(0, (noise_multiplier * max_grad_norm)**2 I)`` from the sampler, and a Poisson sampler that
keeps example ``i`` in step ``s`` when the stream's ``i``-th uniform is below ``q = 1 / batches``.
No torch random function runs while a device trains (tested). The accounting is Opacus's RDP
accountant, unchanged.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsim.client import ClientResult, ClientTrainer
from fedsim.models import get_flat, set_flat
from fedsim.privacy.clipping import clip_and_bit
from fedsim.privacy.events import check_clip_norm, check_noise_std
from fedsim.privacy.noise import TAG_CLIENT, NoiseKey, NoiseSource
from fedsim.registry import resolve_params
from fedsim.types import ClientTask, TrainConfig
from fedsim.validation import int_at_least, number_in, positive_number

__all__ = ["OpacusParams", "OpacusTrainer", "example_level_epsilon", "worst_case_example_epsilon"]


def example_level_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """``epsilon`` of ``steps`` DP-SGD steps at ``sampling_rate`` (Opacus RDP accountant)."""
    if steps == 0:
        return 0.0
    from opacus.accountants import RDPAccountant  # Opacus is imported only when used (~3 s)

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sampling_rate), int(steps))]
    return float(accountant.get_epsilon(delta=delta))


#: RDP orders of the data-independent figure: for one batch per epoch (no sampling, a closed
#: form) Opacus's default orders and two larger ones; with sampling (an order costs a series
#: there) a coarser grid. Any set of orders gives a valid bound; more orders, a tighter one.
_FULL_BATCH_ORDERS = tuple(1 + x / 10.0 for x in range(1, 100)) + tuple(float(a) for a in range(12, 64)) + (128.0, 256.0)
_SAMPLED_ORDERS = tuple(1 + x / 4.0 for x in range(1, 36)) + tuple(float(a) for a in range(10, 64)) + (128.0, 256.0)


def _worst_case_batches() -> tuple[int, ...]:
    """Batches per epoch at which :func:`worst_case_example_epsilon` evaluates: every number up to
    32, then a geometric grid (ratio 1.5) up to ``2**24``, beyond any device size fedsim accepts."""
    grid = list(range(1, 33))
    b = 32.0
    while b < 2**24:
        b *= 1.5
        grid.append(int(b))
    return tuple(grid)


@functools.lru_cache(maxsize=512)
def _rdp_per_step(noise_multiplier: float, batches: int) -> tuple[tuple[float, ...], np.ndarray]:
    """Orders and RDP of one DP-SGD step at sampling rate ``1 / batches``."""
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = _FULL_BATCH_ORDERS if batches == 1 else _SAMPLED_ORDERS
    rdp = compute_rdp(q=1.0 / batches, noise_multiplier=noise_multiplier, steps=1, orders=list(orders))
    return orders, np.asarray(rdp, dtype=np.float64)


@functools.lru_cache(maxsize=256)
def worst_case_example_epsilon(noise_multiplier: float, local_epochs: int, participations: int, delta: float) -> tuple[float, int]:
    """Example-level ``epsilon`` of the worst device size, and its number of batches per epoch.

    A device of ``n`` examples at batch size ``B`` takes ``b = ceil(n / min(B, n))`` steps per
    epoch at sampling rate ``1 / b``; every ``b >= 1`` occurs for some ``n`` whatever ``B``. This
    is the largest ``epsilon`` (Opacus's RDP-to-``(epsilon, delta)`` conversion) of
    ``local_epochs * b * participations`` steps over ``b`` in :func:`_worst_case_batches`: a
    function of the configuration alone. ``epsilon`` is largest at small ``b`` (a handful of
    batches, often one) and falls towards 0 as ``b`` grows, so the grid's maximum is the maximum
    over all ``b`` (tested against every ``b`` between grid points).
    """
    from opacus.accountants.analysis.rdp import get_privacy_spent

    steps_per_batch = int(local_epochs) * int(participations)
    best: tuple[float, int] = (-1.0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": still a valid bound
        for b in _worst_case_batches():
            orders, rdp = _rdp_per_step(float(noise_multiplier), b)
            eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp * (steps_per_batch * b), delta=delta)
            if float(eps) > best[0]:
                best = (float(eps), b)
    return best


def local_schedule(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """``(sampling rate, steps per participation)`` of one device, as Opacus sets them up."""
    batches = math.ceil(num_examples / min(batch_size, num_examples))
    return 1.0 / batches, local_epochs * batches


#: ``use`` word of a device's private streams ``(TAG_CLIENT, round, device, use, step)``.
USE_SAMPLE, USE_NOISE = 0, 1


def _keyed_noise_optimizer_class() -> type:
    """Opacus's ``DPOptimizer`` with the Gaussian noise of each step from the cryptographic sampler
    (built on first use: Opacus is imported only when this trainer trains, ~3 s)."""
    global _KeyedNoiseDPOptimizer
    if _KeyedNoiseDPOptimizer is not None:
        return _KeyedNoiseDPOptimizer
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class KeyedNoiseDPOptimizer(DPOptimizer):
        """``DPOptimizer`` whose noise ``N(0, (z C)^2 I)`` is ``z C`` times the sampler's normals.

        Step ``s`` uses the stream ``(*words, USE_NOISE, s)`` of ``source``: one draw for all
        parameters, split in parameter order. Clipping, summation and scaling are Opacus's.
        """

        def __init__(self, optimizer: torch.optim.Optimizer, *, source: NoiseSource, words: tuple[int, ...],
                     noise_multiplier: float, max_grad_norm: float, expected_batch_size: int) -> None:
            super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                             expected_batch_size=expected_batch_size, loss_reduction="mean")
            self.source = source
            self.words = tuple(words)
            self.noise_steps = 0

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            sizes = [p.summed_grad.numel() for p in self.params]
            normals = self.source.normal((*self.words, USE_NOISE, self.noise_steps), sum(sizes))
            self.noise_steps += 1
            offset = 0
            for p, size in zip(self.params, sizes, strict=True):
                _check_processed_flag(p.summed_grad)
                noise = (normals[offset : offset + size] * std).view_as(p.summed_grad).to(p.summed_grad.dtype)
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)
                offset += size

    _KeyedNoiseDPOptimizer = KeyedNoiseDPOptimizer
    return KeyedNoiseDPOptimizer


_KeyedNoiseDPOptimizer: type | None = None


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
        check_clip_norm(self.max_grad_norm, "max-grad-norm")
        check_noise_std(self.noise_multiplier, self.max_grad_norm, ("noise-multiplier", "max-grad-norm"))
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
        self._epochs = 1
        self._bound: tuple[int, str] | None = None
        self._private: NoiseSource | None = None

    def set_private_source(self, source: NoiseSource | None) -> None:
        """Draw the example sampling and the DP-SGD noise from ``source`` (the run's secret
        :class:`~fedsim.privacy.noise.NoiseSource`), streams ``(TAG_CLIENT, round, device, ...)``.

        Without one (a device), every task draws them under a fresh key from :mod:`secrets`.
        """
        self._private = source

    def _private_stream(self, task: ClientTask, config: TrainConfig) -> tuple[NoiseSource, tuple[int, ...]]:
        """The source and leading words of this task's sampling and noise: secret, never the task seed."""
        words = (TAG_CLIENT, int(config.round), int(task.device_id))
        if self._private is None:  # a device: a key for this task alone, from the OS
            return NoiseSource(NoiseKey.generate()), words
        return self._private, words

    def train_client(self, params: torch.Tensor, task: ClientTask, config: TrainConfig) -> ClientResult:
        if self.objective is not None and self.objective.kind != "classification":
            raise ValueError(f"the opacus trainer trains classification models, the dataset's task is {self.objective.kind!r}")
        n = task.num_examples
        if n == 0:
            return ClientResult(torch.zeros_like(params), 0, 0.0)
        model = copy.deepcopy(self.model)
        set_flat(model, params)
        model.train()
        # Opacus is imported only when this trainer trains (~3 s)
        from opacus import GradSampleModule
        from opacus.validators import ModuleValidator

        ModuleValidator.validate(model, strict=True)
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        module.forbid_grad_accumulation()
        rate, steps = local_schedule(n, config.batch_size, config.local_epochs)
        batches = steps // config.local_epochs
        source, words = self._private_stream(task, config)
        dp_optimizer = _keyed_noise_optimizer_class()(
            torch.optim.SGD(module.parameters(), lr=config.lr),
            source=source,
            words=words,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=n // batches,  # Opacus's int(n * q), without its rounding hazard
        )
        total_loss, total_examples = 0.0, 0
        with warnings.catch_warnings():
            # Opacus's per-example hooks fire on module outputs (inputs need no gradient): benign
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            for step in range(steps):
                # Poisson sampling: each example independently with probability q, from the stream
                keep = torch.from_numpy(source.uniform((*words, USE_SAMPLE, step), n) < rate)
                x, y = task.x[keep], task.y[keep]
                dp_optimizer.zero_grad(set_to_none=True)
                # mean over the sampled examples: Opacus recovers per-example gradients, clips
                # them, the optimizer adds noise to their sum and divides by the *expected* batch size
                logits = module(x)
                loss = F.cross_entropy(logits, y, reduction="mean") if len(y) else logits.sum() * 0.0
                loss.backward()
                dp_optimizer.step()  # a step with an empty batch still adds noise
                total_loss += float(loss.detach()) * len(y)
                total_examples += len(y)
        flat = get_flat(model)
        delta = flat - params
        bit = None
        if config.clip_norm is not None:
            delta, bit = clip_and_bit(delta, config.clip_norm)
        dev = task.device_id
        self._schedule[dev] = (rate, steps)
        self._epochs = int(config.local_epochs)
        self._participations[dev] = self._participations.get(dev, 0) + 1
        return ClientResult(delta.contiguous(), n, total_loss / max(total_examples, 1), bit)

    def set_participation_bound(self, max_participations: int, basis: str) -> None:
        """The most participations per device the run allows, from its public configuration.

        The engine calls it with the strategy's participation limit (``basis="strategy"``) or the
        run's planned rounds (``basis="rounds"``: at most one participation per round); the
        trainer's own ``max_participations`` takes precedence. Without a call, the published
        figure uses the participations observed (only a run's private files should hold that).
        """
        self._bound = (int_at_least("max_participations", max_participations, 1), str(basis))

    def _delta(self, delta: float | None) -> float:
        return self.target_delta if self.target_delta is not None else (delta if delta is not None else 1e-6)

    def _participation_basis(self) -> tuple[int, str]:
        if self.max_participations is not None:
            return self.max_participations, "configured"
        if self._bound is not None:
            return self._bound
        return max(self._participations.values()), "observed"

    def example_privacy(self, *, delta: float | None = None) -> dict[str, Any] | None:
        """The published example-level ``(epsilon, delta)``: data-independent.

        The worst case over every device size (:func:`worst_case_example_epsilon`: every number
        of batches per epoch) of the participations the configuration allows
        (:meth:`set_participation_bound`), so it reveals nothing about the devices' data.
        ``sampling_rate`` and ``local_steps`` are those of the worst-case device size. The delta
        is ``target-delta`` when set, else ``delta`` (the scenario's), else ``1e-6``. ``None``
        before any device trained.
        """
        if not self._schedule:
            return None
        target = self._delta(delta)
        k, basis = self._participation_basis()
        eps, batches = worst_case_example_epsilon(self.noise_multiplier, self._epochs, k, target)
        return {
            "epsilon": eps,
            "delta": target,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sampling_rate": 1.0 / batches,
            "local_steps": self._epochs * batches * k,
            "max_participations": k,
            "participations_basis": basis,
            "device_size_basis": "worst case over every device size",
            "accountant": "opacus-rdp",
            "unit": "example",
        }

    def observed_example_privacy(self, *, delta: float | None = None) -> dict[str, Any] | None:
        """Example-level ``(epsilon, delta)`` of the devices that actually trained: data-dependent.

        The worst trained device (its sampling rate and steps reveal its number of examples) at
        the configured ``max_participations``, else the most participations any device made. For
        ``private/summary.json`` in a DP run; never published there.
        """
        if not self._schedule:
            return None
        target = self._delta(delta)
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

    def state_dict(self) -> dict[str, Any]:
        """What the example-level figures need after a resume: each trained device's schedule
        and participations, and the local epochs."""
        return {
            "schedule": {int(d): [float(q), int(t)] for d, (q, t) in self._schedule.items()},
            "participations": {int(d): int(c) for d, c in self._participations.items()},
            "epochs": self._epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._schedule = {int(d): (float(v[0]), int(v[1])) for d, v in state["schedule"].items()}
        self._participations = {int(d): int(c) for d, c in state["participations"].items()}
        self._epochs = int(state["epochs"])
