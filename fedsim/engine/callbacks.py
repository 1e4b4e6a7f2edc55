"""Round callbacks: plug-ins of the round, called by the round owner at each step.

As pfl-research's training-process callbacks, a :class:`RoundCallback` adds a capability to
every round without being threaded through the round owner's steps: the owner
(:class:`~fedsim.engine.rounds.RoundOwner`) calls each hook of each callback in
:attr:`~fedsim.engine.rounds.RoundOwner.callbacks` at its place, and every hook is a no-op by
default, so a callback overrides only what it needs. The audit's canary clients
(:class:`fedsim.engine.canaries.CanaryCallback`, ``[audit] canaries``) are one.

==========================  =========================================================================
hook                        called
==========================  =========================================================================
:meth:`~RoundCallback.on_key`            the run is keyed (construction, and again on resume)
:meth:`~RoundCallback.split_cohort`      :meth:`RoundOwner.begin`: the selected cohort, split into
                                         devices the executor trains and the callback's own
:meth:`~RoundCallback.server_reports`    :meth:`RoundOwner.accumulator`: updates the server makes for
                                         the callback's devices (validated and summed like any)
:meth:`~RoundCallback.before_aggregate`  :meth:`RoundOwner.end`, before the strategy aggregates
:meth:`~RoundCallback.after_aggregate`   :meth:`RoundOwner.end`, with the new global model
:meth:`~RoundCallback.on_row`            :meth:`RoundOwner.end`: add keys to the round's row
:meth:`~RoundCallback.on_summary`        :meth:`RoundOwner.finish`: add keys to ``summary.json``
:meth:`~RoundCallback.save`              :meth:`RoundOwner.finish`, with a run directory
:meth:`~RoundCallback.state_dict`,       checkpoints, under :attr:`~RoundCallback.state_key`
:meth:`~RoundCallback.load_state_dict`
==========================  =========================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.types import CohortChunk

__all__ = ["RoundCallback"]


class RoundCallback:
    """A plug-in of every round; each hook is a no-op unless overridden.

    Attributes
    ----------
    state_key:
        The checkpoint key of :meth:`state_dict` (unique among a run's callbacks).
    extra_devices:
        Devices the callback adds to the population (ids after the real devices); they check in,
        are limited and selected like real devices, and :meth:`split_cohort` takes them out of
        the cohort the executor trains.
    keyed:
        Whether what the callback releases depends on the run's secret noise key (a run with
        such a callback keeps its key and release record as a DP run does).
    """

    state_key: str = "callback"
    extra_devices: int = 0
    keyed: bool = False

    def on_key(self, noise: Any) -> None:
        """The run's secret noise source (:class:`~fedsim.privacy.noise.NoiseSource`), set or replaced."""

    def split_cohort(self, round: int, cohort: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(trained, own)``: the devices of ``cohort`` the executor trains, and this callback's."""
        return cohort, np.empty(0, dtype=np.int64)

    def server_reports(self, round: int, own: np.ndarray, clip_norm: float | None) -> CohortChunk | None:
        """The updates the server makes for this callback's selected devices ``own``, or ``None``."""
        return None

    def before_aggregate(self, round: int, params: torch.Tensor) -> None:
        """The global model ``params`` the round started from, before the strategy aggregates."""

    def after_aggregate(self, round: int, before: torch.Tensor, after: torch.Tensor, accepted: np.ndarray) -> None:
        """The strategy aggregated: ``before`` and ``after`` the round, the ``accepted`` devices."""

    def on_row(self, row: dict[str, Any], params: torch.Tensor) -> None:
        """Add the callback's keys to the round's metrics ``row`` (published as the row is)."""

    def on_summary(self, summary: dict[str, Any], params: torch.Tensor, rounds_done: int) -> None:
        """Add the callback's keys to ``summary.json`` (``summary`` already holds rho and epsilon)."""

    def save(self, run_dir: Path, params: torch.Tensor, rounds_done: int) -> None:
        """Write the callback's files into the run directory at the end of the run."""

    def state_dict(self) -> Any:
        """What a checkpoint keeps of the callback (``None``: nothing)."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`."""
