"""Deployment-equivalent noise: a small simulated cohort with a production cohort's noise per client.

A deployment trains ``N`` clients per round and adds Gaussian noise of standard deviation
``z C`` to the sum of their clipped updates, so each averaged update carries noise ``z C / N``.
A simulation of ``n << N`` clients per round that adds noise of standard deviation
``z C n / N`` to the sum of *its* clients' updates gives each averaged update the same noise
``z C / N``: its training sees the deployment's noise per client. This is the field's
established way to study production DP on a small machine: pfl-research's
``noise_cohort_size`` (``benchmarks/utils/argument_parsing.py``: the noise is scaled by
``cohort_size / noise_cohort_size`` and the privacy is accounted for the larger cohort over a
stated population), TensorFlow Federated's DP tutorial ("increase the noise while
proportionally scaling up the clients per round"), and Kairouz et al. 2021's StackOverflow runs.

Two guarantees follow, and they must never be confused:

* the **run's** guarantee (``rho``, ``epsilon``): the simulation as it ran, a mechanism with noise
  multiplier ``z n / N`` on its own ``n`` clients. It is a true statement about the people whose
  data the simulation used, and usually a weak one (large ``rho``);
* the **deployment-equivalent** guarantee (``equivalent_rho``, ``equivalent_epsilon``): the
  guarantee of the *configuration* with ``N`` clients per round and noise multiplier ``z`` over
  the same rounds and participation limit ``(k, b)``. It is a statement about that
  configuration, not about this run: a deployment that runs it protects its own users at that
  level. For DP-FTRL (tree, BLT, banded) and for DP-FedAvg with fixed cohorts it depends on
  ``(z, T, k, b)`` only; for DP-FedAvg with Poisson sampling the amplification depends on the
  deployment's sampling rate ``N / P`` and hence on its population ``P``, which must be stated.

Filling ``N`` clients in every round of ``T`` while each device contributes at most ``k`` times,
at least ``b`` rounds apart (``b`` rounds strictly between), needs at least
``N * max(b + 1, ceil(T / k))`` devices (:func:`min_population`): ``N (b + 1)`` for the
separation (no device serves two rounds of one window of ``b + 1``) and ``N T / k`` for the
participation count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsim.validation import int_at_least

__all__ = ["STATEMENT", "Deployment", "check_deployment", "min_population", "simulated_noise_multiplier"]

#: What the deployment-equivalent figures are, in words (summary.json, console, plots).
STATEMENT = (
    "the guarantee of a deployment with this many clients per round and this noise multiplier over "
    "the same rounds and participation limit; a statement about that configuration, not about this run"
)


@dataclass(frozen=True)
class Deployment:
    """The deployment a simulation is equivalent to (``[privacy] equivalent-cohort`` and
    ``equivalent-population``).

    Attributes
    ----------
    cohort:
        ``N``: the deployment's clients per round (its expected cohort with Poisson sampling).
    population:
        ``P``: its devices, or ``None`` when not stated (needed for Poisson sampling).
    """

    cohort: int
    population: int | None = None

    def __post_init__(self) -> None:
        int_at_least("equivalent-cohort", self.cohort, 1)
        int_at_least("equivalent-population", self.population, 1, optional=True)

    @property
    def sampling_rate(self) -> float | None:
        """``q = N / P`` of Poisson sampling in the deployment (``None`` without a population)."""
        return None if self.population is None else min(1.0, self.cohort / self.population)


def min_population(cohort: int, rounds: int, max_participations: int | None, min_separation: int) -> int:
    """The fewest devices that fill ``cohort`` clients in each of ``rounds`` rounds under ``(k, b)``.

    ``cohort * max(b + 1, ceil(rounds / k))`` (``k = None``: no participation count, so
    ``cohort * (b + 1)``), capped by the run never needing more than ``cohort * rounds`` devices.
    """
    int_at_least("cohort", cohort, 1)
    int_at_least("rounds", rounds, 1)
    windows = min(min_separation + 1, rounds)
    if max_participations is not None:
        windows = max(windows, math.ceil(rounds / max_participations))
    return cohort * windows


def simulated_noise_multiplier(noise_multiplier: float, denominator: float, cohort: int) -> float:
    """The simulation's noise multiplier ``z n / N``: noise std ``z C n / N`` on the sum of its
    ``n`` (``denominator``) clients, i.e. the deployment's ``z C / N`` on each averaged update."""
    return float(noise_multiplier) * float(denominator) / float(cohort)


def check_deployment(
    deployment: Deployment,
    *,
    clients_per_round: int,
    rounds: int,
    max_participations: int | None,
    min_separation: int,
    poisson: bool,
) -> int:
    """Refuse a deployment a simulation cannot stand for; return its :func:`min_population`.

    ``ValueError`` (one line, starting with the key) when ``equivalent-cohort`` is smaller than
    the simulated cohort, when the stated population cannot supply the cohort under ``(k, b)``
    (or is smaller than the cohort), and when Poisson sampling has no stated population.
    """
    n = deployment.cohort
    if n < clients_per_round:
        raise ValueError(
            f"equivalent-cohort = {n} is smaller than the simulated cohort (clients-per-round = "
            f"{clients_per_round}): the deployment's noise per client would be larger than the run's; "
            f"use equivalent-cohort >= {clients_per_round}, or leave it out (0)"
        )
    need = min_population(n, rounds, max_participations, min_separation)
    if poisson and deployment.population is None:
        raise ValueError(
            f"equivalent-population must be stated for DP-FedAvg with Poisson sampling: the deployment's "
            f"amplification depends on its sampling rate equivalent-cohort / equivalent-population "
            f"(at least {need} devices for equivalent-cohort = {n})"
        )
    p = deployment.population
    if p is not None and p < need:
        k = "no limit" if max_participations is None else str(max_participations)
        raise ValueError(
            f"equivalent-population = {p} cannot supply equivalent-cohort = {n} clients in each of "
            f"{rounds} rounds under k = {k}, b = {min_separation}: it needs at least {need} devices "
            f"({n} x {need // n})"
        )
    return need
