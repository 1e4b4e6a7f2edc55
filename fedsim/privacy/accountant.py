"""User-level privacy accounting for fedsim runs (zCDP composition).

Accounting rules
----------------
Each round's release is a Gaussian mechanism on a sum of per-device updates
clipped to L2 norm ``C`` with noise ``N(0, (z C)**2)``; neighbouring datasets
differ by adding or removing one device (user-level DP). A Gaussian mechanism
with L2 sensitivity ``Delta`` and noise ``sigma`` is ``Delta**2 / (2 sigma**2)``-zCDP,
and zCDP composes additively (Bun & Steinke, TCC 2016, arXiv:1605.02065,
Propositions 1.6 and 1.7). With ``n`` events of a kind recorded so far:

* ``TreeAggregationEvent`` (DP-FTRL, Kairouz et al. ICML 2021, arXiv:2103.00039):
  ``rho = S_n / (2 z**2)`` with ``S_n`` the exact worst-case sum of squared node
  counts over the first ``n`` leaves (:mod:`fedsim.privacy.sensitivity`). All tree
  events of a ledger must share ``(z, k, b, E)``.
* ``MatrixFactorizationEvent`` (DP-FTRL with a BLT or banded Toeplitz strategy ``C``;
  Denisov et al. NeurIPS 2022, arXiv:2404.16706, arXiv:2306.08153):
  ``rho = sens_n**2 / (2 z**2)`` with ``sens_n**2`` the worst case under ``(k, b)`` of
  the leading ``n x n`` block of ``C`` (the first ``n`` rounds' releases are a
  Gaussian mechanism on that block; :func:`fedsim.privacy.matrix_factorization.
  toeplitz_sensitivity_sq`, exact for the strategies fedsim optimises, an upper
  bound otherwise). All such events of a ledger must share ``(z, k, b, family, params)``.
* ``GaussianEvent`` (no amplification): ``rho = m / (2 z**2)`` with
  ``m = min(k, ceil(n / (b + 1)))`` (``k = n`` when unset), the most rounds a
  device can contribute to. If ``z`` varies across rounds, ``rho`` is the exact
  maximum of ``sum 1 / (2 z_i**2)`` over the rounds ``i`` of a pattern allowed by
  ``(k, b)``. All Gaussian events must share ``(k, b)``.
* ``SampledGaussianEvent`` (DP-FedAvg with Poisson sampling at rate ``q``):
  ``rho`` is the *unamplified* bound above (sampling is ignored), while
  ``epsilon`` and ``epsilon_rdp`` use the Renyi DP of the subsampled Gaussian
  mechanism computed by Opacus (``opacus.accountants.analysis.rdp``; Mironov,
  Talwar & Zhang 2019, arXiv:1908.10530), composed over the ``n`` rounds. At
  each RDP order the smaller of the amplified RDP and ``alpha * rho_sampled`` is
  used (both are valid bounds). So for sampled runs *epsilon is amplified while
  rho is not*.
* Different kinds in one ledger compose by adding their ``rho`` (and their RDP
  curves). The positions that ``(k, b)`` refer to are the positions of events
  of that kind in the ledger (one event per round is expected).

Conversions to ``(epsilon, delta)`` (:mod:`fedsim.privacy.conversions`):
``epsilon`` is the tight Gaussian-profile conversion of ``rho`` (for ledgers with
sampled events: the smaller of that and the RDP conversion), ``epsilon_rdp`` the
RDP conversion (Canonne, Kamath & Steinke 2020).

The accountant does not warn when ``k`` exceeds what fits in the rounds so far
(it always does early in a run); the planning functions below do.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedsim.privacy.conversions import (
    epsilon_from_rho,
    epsilon_rdp_from_rho,
    validate_delta,
)
from fedsim.privacy.events import (
    GaussianEvent,
    MatrixFactorizationEvent,
    PrivacyEvent,
    PrivacyLedger,
    SampledGaussianEvent,
    TreeAggregationEvent,
    check_noise_multiplier,
)
from fedsim.privacy.sensitivity import (
    effective_max_participations,
    exact_gaussian_weight_sum,
    max_gaussian_participations,
    max_tree_sensitivity_sq,
    prefix_cache,
)
from fedsim.validation import int_at_least, is_int

__all__ = [
    "RDP_ORDERS",
    "Accountant",
    "PrivacyReport",
    "dp_fedavg_privacy",
    "dp_ftrl_privacy",
    "mf_privacy",
    "mf_sensitivity_sq",
    "sampled_gaussian_epsilon",
]

# The default orders of Opacus's RDPAccountant (1.1 .. 10.9 by 0.1, then 12 .. 63),
# extended upwards for small deltas / large noise.
RDP_ORDERS: tuple[float, ...] = (
    tuple(1.0 + x / 10.0 for x in range(1, 100))
    + tuple(float(a) for a in range(12, 64))
    + (64.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 1024.0)
)


@functools.cache
def _opacus_rdp():
    """Opacus's RDP analysis module (``opacus.accountants.analysis.rdp``).

    Importing the ``opacus`` package imports torch (seconds); the analysis module
    itself only needs numpy and scipy. When opacus is not loaded yet, that one
    file of the installed opacus is loaded on its own, so planning from the
    command line stays fast; otherwise the regular module is used.
    """
    loaded = sys.modules.get("opacus.accountants.analysis.rdp")
    if loaded is not None:
        return loaded
    if "opacus" not in sys.modules:
        spec = importlib.util.find_spec("opacus")
        locations = spec.submodule_search_locations if spec is not None else None
        if locations:
            path = Path(next(iter(locations))) / "accountants" / "analysis" / "rdp.py"
            if path.is_file():
                file_spec = importlib.util.spec_from_file_location("_fedsim_opacus_rdp", path)
                if file_spec is not None and file_spec.loader is not None:
                    module = importlib.util.module_from_spec(file_spec)
                    file_spec.loader.exec_module(module)
                    return module
    from opacus.accountants.analysis import rdp

    return rdp


@dataclass(frozen=True)
class PrivacyReport:
    """Privacy spent so far; all fields are None for an empty ledger (no DP)."""

    rho: float | None
    epsilon: float | None
    epsilon_rdp: float | None
    delta: float | None
    noise_multiplier: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


_EMPTY_REPORT = PrivacyReport(None, None, None, None, None)


@functools.lru_cache(maxsize=256)
def _sampled_rdp_per_round(sampling_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one subsampled-Gaussian round at :data:`RDP_ORDERS` (Opacus)."""
    rdp = _opacus_rdp().compute_rdp(
        q=sampling_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
    )
    out = np.asarray(rdp, dtype=np.float64)
    out.setflags(write=False)
    return out


def _privacy_spent(rdp: Sequence[float] | np.ndarray, delta: float) -> float:
    """Opacus's RDP-to-(epsilon, delta) conversion over :data:`RDP_ORDERS`, without its warnings.

    Opacus warns when the best order is the smallest or the largest of the grid: the epsilon it
    returns is still a valid upper bound (a finer grid could only lower it), and where it is
    loose (large epsilon, optimum at the smallest order) the accountant reports the minimum with the
    zCDP conversion anyway. A user cannot act on the warning, so it is not shown.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Optimal order is the (smallest|largest) alpha")
        eps, _ = _opacus_rdp().get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def sampled_gaussian_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int,
                             delta: float) -> float:
    """Amplified epsilon of ``rounds`` Poisson-subsampled Gaussian rounds (Opacus RDP, no cap)."""
    delta = validate_delta(delta)
    rdp = _sampled_rdp_per_round(float(sampling_rate), float(noise_multiplier)) * rounds
    return _privacy_spent(rdp, delta)


class _Group:
    """The events of one kind: how many, the distinct ones with counts, and the order."""

    __slots__ = ("count", "distinct", "ordered")

    def __init__(self, count: int, distinct: Mapping[PrivacyEvent, int],
                 ordered: Sequence[PrivacyEvent] | None) -> None:
        self.count = count
        self.distinct = distinct
        self.ordered = ordered  # only needed when noise multipliers differ


def _single_params(group: _Group, fields: tuple[str, ...], kind: str) -> dict:
    params = {tuple(getattr(e, f) for f in fields) for e in group.distinct}
    if len(params) > 1:
        raise ValueError(
            f"ledger mixes {kind} events with different {', '.join(fields)}: {sorted(params, key=str)}; "
            "a run must use one participation schedule"
        )
    (values,) = params
    return dict(zip(fields, values, strict=True))


def _tree_rho(group: _Group) -> tuple[float, float]:
    params = _single_params(
        group, ("noise_multiplier", "max_participations", "min_separation", "restart_every"),
        "TreeAggregationEvent",
    )
    s = prefix_cache(params["max_participations"], params["min_separation"],
                      params["restart_every"])(group.count)
    z = params["noise_multiplier"]
    return s / (2.0 * z * z), z


@functools.lru_cache(maxsize=4096)
def mf_sensitivity_sq(family: str, params: tuple[float, ...], max_participations: int,
                      min_separation: int, rounds: int) -> tuple[float, bool]:
    """``(sens^2, exact)`` of the first ``rounds`` rounds of a matrix-factorization strategy."""
    from fedsim.privacy.matrix_factorization import strategy_coefs, toeplitz_sensitivity_sq

    sens = toeplitz_sensitivity_sq(strategy_coefs(family, params, rounds), rounds,
                                   max_participations, min_separation)
    return sens.value, sens.exact


def _mf_rho(group: _Group) -> tuple[float, float]:
    params = _single_params(
        group, ("noise_multiplier", "max_participations", "min_separation", "family", "params"),
        "MatrixFactorizationEvent",
    )
    s, _ = mf_sensitivity_sq(params["family"], params["params"], params["max_participations"],
                             params["min_separation"], group.count)
    z = params["noise_multiplier"]
    return s / (2.0 * z * z), z


def _unamplified_rho(group: _Group, kind: str) -> tuple[float, float | None]:
    params = _single_params(group, ("max_participations", "min_separation"), kind)
    k, b = params["max_participations"], params["min_separation"]
    zs = {e.noise_multiplier for e in group.distinct}
    if len(zs) == 1:
        (z,) = zs
        m = max_gaussian_participations(group.count, k, b)
        return m / (2.0 * z * z), z
    ordered = group.ordered
    assert ordered is not None and len(ordered) == group.count
    weights = np.array([1.0 / (2.0 * e.noise_multiplier ** 2) for e in ordered])
    return exact_gaussian_weight_sum(weights, k, b), None


def _compose(groups: Mapping[type, _Group], delta: float) -> PrivacyReport:
    groups = {cls: g for cls, g in groups.items() if g.count > 0}
    if not groups:
        return _EMPTY_REPORT
    rho_other = 0.0
    zs: list[float | None] = []
    if TreeAggregationEvent in groups:
        r, z = _tree_rho(groups[TreeAggregationEvent])
        rho_other += r
        zs.append(z)
    if MatrixFactorizationEvent in groups:
        r, z = _mf_rho(groups[MatrixFactorizationEvent])
        rho_other += r
        zs.append(z)
    if GaussianEvent in groups:
        r, z = _unamplified_rho(groups[GaussianEvent], "GaussianEvent")
        rho_other += r
        zs.append(z)
    sampled = groups.get(SampledGaussianEvent)
    if sampled is None:
        rho = rho_other
        eps = epsilon_from_rho(rho, delta)
        eps_rdp = epsilon_rdp_from_rho(rho, delta)
    else:
        rho_sampled, z = _unamplified_rho(sampled, "SampledGaussianEvent")
        zs.append(z)
        rho = rho_other + rho_sampled
        orders = np.asarray(RDP_ORDERS)
        amplified = np.zeros_like(orders)
        for event, count in sampled.distinct.items():
            amplified = amplified + _sampled_rdp_per_round(
                event.sampling_rate, event.noise_multiplier) * count
        curve = np.minimum(amplified, orders * rho_sampled) + orders * rho_other
        eps_curve = _privacy_spent(curve, delta)
        eps_rdp = min(float(eps_curve), epsilon_rdp_from_rho(rho, delta))
        eps = min(eps_rdp, epsilon_from_rho(rho, delta))
    noise = zs[0] if zs and all(z is not None and z == zs[0] for z in zs) else None
    return PrivacyReport(rho=rho, epsilon=eps, epsilon_rdp=eps_rdp, delta=delta,
                         noise_multiplier=noise)


_KINDS = (TreeAggregationEvent, MatrixFactorizationEvent, GaussianEvent, SampledGaussianEvent)


class Accountant:
    """Turns a :class:`PrivacyLedger` into a :class:`PrivacyReport` at a fixed ``delta``.

    Cost per report is independent of the ledger length for ledgers whose events
    of each kind are identical (the usual case): per-round reporting over a
    2000-round DP-FTRL run costs well under a second in total.
    """

    def __init__(self, delta: float) -> None:
        self.delta = validate_delta(delta)

    def __repr__(self) -> str:
        return f"Accountant(delta={self.delta!r})"

    def report(self, ledger: PrivacyLedger) -> PrivacyReport:
        """Privacy spent by everything recorded in ``ledger``."""
        groups = {}
        for cls in _KINDS:
            distinct = ledger.distinct_events(cls)
            if distinct:
                groups[cls] = _Group(sum(distinct.values()), distinct, ledger.events_of_type(cls))
        return _compose(groups, self.delta)

    def report_with(self, ledger: PrivacyLedger, round: int, event: PrivacyEvent) -> PrivacyReport:
        """The report if ``event`` were recorded next for ``round``; ``ledger`` is not modified.

        Raises ``ValueError``/``TypeError`` exactly where ``ledger.record`` would.
        """
        if not is_int(round):
            raise ValueError(f"round must be an integer, got {round!r}")
        if type(event) not in _KINDS:
            raise TypeError(
                f"event must be a GaussianEvent, SampledGaussianEvent, TreeAggregationEvent or "
                f"MatrixFactorizationEvent, got {event!r}"
            )
        entries = ledger.events()
        if entries and round <= entries[-1][0]:
            raise ValueError(
                f"rounds must be strictly increasing: got round {round} after round {entries[-1][0]}"
            )
        groups = {}
        for cls in _KINDS:
            distinct = ledger.distinct_events(cls)
            ordered = ledger.events_of_type(cls)
            if cls is type(event):
                distinct = dict(distinct)
                distinct[event] = distinct.get(event, 0) + 1
                ordered = _Appended(ordered, event)
            if distinct:
                groups[cls] = _Group(sum(distinct.values()), distinct, ordered)
        return _compose(groups, self.delta)


class _Appended(Sequence):
    """``base + [extra]`` without copying ``base``."""

    def __init__(self, base: Sequence, extra: object) -> None:
        self._base = base
        self._extra = extra

    def __len__(self) -> int:
        return len(self._base) + 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self._base)
        if i < 0:
            i += n + 1
        if i == n:
            return self._extra
        if 0 <= i < n:
            return self._base[i]
        raise IndexError(i)


def dp_ftrl_privacy(noise_multiplier: float, rounds: int, max_participations: int,
                    min_separation: int, delta: float,
                    restart_every: int | None = None) -> PrivacyReport:
    """Predicted privacy of a ``rounds``-round DP-FTRL run (tree aggregation).

    Equal to ``Accountant(delta).report`` of a ledger holding ``rounds`` identical
    :class:`TreeAggregationEvent`. Warns (``UserWarning``) when
    ``max_participations`` cannot be reached, naming the effective value.
    """
    z = check_noise_multiplier(noise_multiplier)
    rounds = int_at_least("rounds", rounds, 1)
    delta = validate_delta(delta)
    event = TreeAggregationEvent(z, max_participations, min_separation, restart_every)
    effective_max_participations(rounds, event.max_participations, event.min_separation, warn=True)
    s = max_tree_sensitivity_sq(rounds, event.max_participations, event.min_separation,
                                event.restart_every)
    rho = s / (2.0 * z * z)
    return PrivacyReport(rho=rho, epsilon=epsilon_from_rho(rho, delta),
                         epsilon_rdp=epsilon_rdp_from_rho(rho, delta), delta=delta,
                         noise_multiplier=z)


def mf_privacy(noise_multiplier: float, rounds: int, max_participations: int,
               min_separation: int, delta: float, family: str,
               params: tuple[float, ...]) -> PrivacyReport:
    """Predicted privacy of a ``rounds``-round matrix-factorization DP-FTRL run.

    Equal to ``Accountant(delta).report`` of a ledger holding ``rounds`` identical
    :class:`MatrixFactorizationEvent` (the same function computes ``rho``).
    """
    z = check_noise_multiplier(noise_multiplier)
    rounds = int_at_least("rounds", rounds, 1)
    delta = validate_delta(delta)
    event = MatrixFactorizationEvent(z, max_participations, min_separation, family, params)
    return _compose({MatrixFactorizationEvent: _Group(rounds, {event: rounds}, None)}, delta)


def dp_fedavg_privacy(noise_multiplier: float, rounds: int, delta: float,
                      sampling_rate: float | None = None, max_participations: int | None = None,
                      min_separation: int = 0) -> PrivacyReport:
    """Predicted privacy of a ``rounds``-round DP-FedAvg run.

    Without ``sampling_rate``: a Gaussian mechanism per round, no amplification
    (``max_participations`` None means every round). With it: Poisson sampling at
    that rate (amplified ``epsilon``, unamplified ``rho``; see the module docstring).
    Equal to ``Accountant(delta).report`` of the ledger of ``rounds`` identical events.
    """
    z = check_noise_multiplier(noise_multiplier)
    rounds = int_at_least("rounds", rounds, 1)
    delta = validate_delta(delta)
    if sampling_rate is None:
        event: PrivacyEvent = GaussianEvent(z, max_participations, min_separation)
    else:
        event = SampledGaussianEvent(z, sampling_rate, max_participations, min_separation)
    if event.max_participations is not None:
        effective_max_participations(rounds, event.max_participations, event.min_separation,
                                     warn=True)
    return _compose({type(event): _Group(rounds, {event: rounds}, None)}, delta)


def clear_caches() -> None:
    """Empty the accounting memo caches, this module's and :mod:`fedsim.privacy.sensitivity`'s."""
    from fedsim.privacy import sensitivity

    _sampled_rdp_per_round.cache_clear()
    sensitivity.clear_caches()
