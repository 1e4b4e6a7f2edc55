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
* ``ClippedCountEvent`` (adaptive clipping's clipped-count query, Andrew et al.
  NeurIPS 2021, arXiv:1905.03871; recorded in the same round as the update's
  event): ``rho = m / (2 z_b**2)`` as for ``GaussianEvent``. Under Poisson
  sampling its RDP curve is the joint sampled Gaussian's (noise multiplier
  ``(z**-2 + z_b**-2)**-1/2``) minus its round's update event's, so the ledger's
  curve is the joint mechanism's; a sampled count without its update event is refused.
* Different kinds in one ledger compose by adding their ``rho`` (and their RDP
  curves; the amplified kinds' summed curve is capped by ``alpha`` times their
  summed ``rho``). The positions that ``(k, b)`` refer to are the positions of
  events of that kind in the ledger (one event of each kind per round is expected).

Each kind computes its own ``rho`` (and, if amplified, RDP curve) from the group of its events
(:class:`fedsim.privacy.events.PrivacyEvent`); this module only composes the registered kinds, in
their registration order, so a new kind of event needs no change here.

Conversions to ``(epsilon, delta)`` (:mod:`fedsim.privacy.conversions`):
``epsilon`` is the tight Gaussian-profile conversion of ``rho`` (for ledgers with
sampled events: the smaller of that and the RDP conversion), ``epsilon_rdp`` the
RDP conversion (Canonne, Kamath & Steinke 2020).

The accountant does not warn when ``k`` exceeds what fits in the rounds so far
(it always does early in a run); the planning functions below do.

Planning is the same computation on the events a mechanism says its run will record
(:meth:`fedsim.privacy.mechanisms.Mechanism.plan_events`, in a
:meth:`~fedsim.privacy.events.PrivacyLedger.planned` ledger); :func:`noise_rho` gives the ``rho``
of such a ledger at another noise multiplier, which calibration bisects on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fedsim.privacy.conversions import (
    epsilon_from_rho,
    epsilon_rdp_from_rho,
    validate_delta,
)
from fedsim.privacy.events import (
    EventGroup,
    GaussianEvent,
    MatrixFactorizationEvent,
    PrivacyEvent,
    PrivacyLedger,
    SampledGaussianEvent,
    TreeAggregationEvent,
    check_event,
    check_next,
    check_noise_multiplier,
    event_kinds,
    mf_sensitivity_sq,
)
from fedsim.privacy.rdp import RDP_ORDERS, privacy_spent, sampled_gaussian_epsilon
from fedsim.privacy.sensitivity import effective_max_participations
from fedsim.validation import int_at_least, is_int

__all__ = [
    "RDP_ORDERS",
    "Accountant",
    "PrivacyReport",
    "dp_fedavg_privacy",
    "dp_ftrl_privacy",
    "ledger_groups",
    "mf_privacy",
    "mf_sensitivity_sq",
    "noise_rho",
    "sampled_gaussian_epsilon",
]


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

Groups = Mapping[type[PrivacyEvent], EventGroup]


def _rho_parts(groups: Groups) -> tuple[float, float, list[tuple[type[PrivacyEvent], EventGroup, float]],
                                        list[float | None]]:
    """``(rho, rho of the unamplified kinds, the amplified groups with their rho, the zs)``."""
    plain = 0.0
    amplified: list[tuple[type[PrivacyEvent], EventGroup, float]] = []
    zs: list[float | None] = []
    for cls, group in groups.items():
        r, z = cls.group_rho(group)
        zs.append(z)
        if cls.amplified:
            amplified.append((cls, group, r))
        else:
            plain += r
    rho = plain
    for _, _, r in amplified:
        rho += r
    return rho, plain, amplified, zs


def _compose(groups: Groups, delta: float) -> PrivacyReport:
    groups = {cls: g for cls, g in groups.items() if g.count > 0}
    if not groups:
        return _EMPTY_REPORT
    for cls in groups:
        cls.check_groups(groups)
    rho, plain, amplified, zs = _rho_parts(groups)
    if not amplified:
        eps = epsilon_from_rho(rho, delta)
        eps_rdp = epsilon_rdp_from_rho(rho, delta)
    else:
        # the amplified kinds' curves are added, then capped by alpha times their summed rho: both
        # sums are bounds on the composition (a kind's curve may be an increment over another's,
        # as a sampled clipped count's over its round's update)
        orders = np.asarray(RDP_ORDERS)
        summed = sum(cls.group_rdp(group) for cls, group, _ in amplified)
        curve = np.minimum(summed, orders * sum(r for _, _, r in amplified))
        curve = curve + orders * plain
        eps_curve = privacy_spent(curve, delta)
        eps_rdp = min(float(eps_curve), epsilon_rdp_from_rho(rho, delta))
        eps = min(eps_rdp, epsilon_from_rho(rho, delta))
    noise = zs[0] if zs and all(z is not None and z == zs[0] for z in zs) else None
    return PrivacyReport(rho=rho, epsilon=eps, epsilon_rdp=eps_rdp, delta=delta,
                         noise_multiplier=noise)


def ledger_groups(ledger: PrivacyLedger) -> dict[type[PrivacyEvent], EventGroup]:
    """The ledger's events grouped by kind, in the registered kinds' order."""
    groups = {}
    for cls in event_kinds():
        distinct = ledger.distinct_events(cls)
        if distinct:
            groups[cls] = EventGroup(sum(distinct.values()), distinct, ledger.events_of_type(cls))
    return groups


def noise_rho(ledger: PrivacyLedger) -> Callable[[float], float]:
    """``z -> rho`` of ``ledger`` with every event's noise multiplier set to ``z``.

    The accountant's own ``rho`` (the same kinds' :meth:`~fedsim.privacy.events.PrivacyEvent.
    group_rho`, composed in the same order): what calibration bisects on. Each call costs the
    distinct events, not the ledger's length.
    """
    groups = ledger_groups(ledger)

    def rho_at(noise_multiplier: float) -> float:
        renoised = {cls: g.with_noise(noise_multiplier) for cls, g in groups.items()}
        return _rho_parts(renoised)[0] if renoised else 0.0

    return rho_at


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
        return _compose(ledger_groups(ledger), self.delta)

    def report_with(self, ledger: PrivacyLedger, round: int,
                    event: PrivacyEvent | Sequence[PrivacyEvent]) -> PrivacyReport:
        """The report if ``event`` (or each of a sequence of events, in order) were recorded next
        for ``round``; ``ledger`` is not modified.

        Raises ``ValueError``/``TypeError`` exactly where ``ledger.record`` would.
        """
        if not is_int(round):
            raise ValueError(f"round must be an integer, got {round!r}")
        events = list(event) if isinstance(event, list | tuple) else [event]
        entries = ledger.events()
        for e in events:
            check_event(e)
            check_next(entries, round, e)
            entries.append((round, e))
        groups = {}
        for cls in event_kinds():
            distinct: Mapping[PrivacyEvent, int] = ledger.distinct_events(cls)
            ordered: Sequence[PrivacyEvent] = ledger.events_of_type(cls)
            for e in events:
                if cls is type(e):
                    distinct = dict(distinct)
                    distinct[e] = distinct.get(e, 0) + 1
                    ordered = _Appended(ordered, e)
            if distinct:
                groups[cls] = EventGroup(sum(distinct.values()), distinct, ordered)
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
    return _planned(event, rounds, delta)


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
    return _planned(event, rounds, delta)


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
    return _planned(event, rounds, delta)


def _planned(event: PrivacyEvent, rounds: int, delta: float) -> PrivacyReport:
    """The report of a ledger of ``rounds`` copies of ``event`` (without building it)."""
    return _compose({type(event): EventGroup(rounds, {event: rounds}, None)}, delta)


def clear_caches() -> None:
    """Empty the accounting memo caches (RDP, sensitivities)."""
    from fedsim.privacy import rdp, sensitivity

    rdp.clear_caches()
    mf_sensitivity_sq.cache_clear()
    sensitivity.clear_caches()
