"""Canary clients in a run: the engine side of :mod:`fedsim.privacy.audit`.

With ``[audit] canaries = n`` the population gets ``n`` extra devices, ids ``num_devices`` to
``num_devices + n - 1``. They check in, are limited by the devices' and the server's
participation ledgers and are selected exactly like real devices; when one is in a cohort, its
update is its canary direction scaled to the round's clip bound (``C c_i``), validated by the
server like any update and summed into the round's release. So canaries are part of the released
model and the formal ``rho`` covers them as it covers any device. The strategy's own view of the
population (``StrategyContext.num_devices``: Poisson sampling rate, denominators) stays that of
the real devices, so the formal accounting of the scenario is unchanged by the audit.

The ``2 n`` directions (``n`` inserted, ``n`` never inserted) come from the run's noise source
(tag :data:`fedsim.privacy.audit.TAG_AUDIT`), never from the public seed. They are kept with the
run's secrets in ``secret/canaries.pt`` (mode 0600, in a 0700 directory), never in a public
file; ``fedsim audit RUN_DIR`` recomputes the estimates from them.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.data.federated import FederatedData
from fedsim.engine.callbacks import RoundCallback
from fedsim.errors import FedsimError, ScenarioError
from fedsim.privacy.audit import (
    THREAT_MODELS,
    NormalSource,
    canary_directions,
    cosines,
    estimate_epsilon,
)
from fedsim.scenario import Scenario, check_canaries_fit_population
from fedsim.types import CohortChunk

#: Where a run keeps its secrets, relative to the run directory.
SECRET_DIR = "secret"
CANARY_FILE = "canaries.pt"
_FORMAT = 1


class AuditError(FedsimError):
    """A run directory cannot be audited (no canaries, unreadable canary file, ...)."""


def secret_path(run_dir: str | Path, name: str) -> Path:
    """``RUN_DIR/secret/name``; creates ``secret/`` readable by its owner only (0700)."""
    directory = Path(run_dir) / SECRET_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    return directory / name


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically to ``path`` with mode 0600 from the start."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class CanaryClients:
    """The canary clients of one run.

    Parameters
    ----------
    count:
        ``n`` inserted canaries (as many never-inserted directions are kept).
    num_params:
        Model dimension ``d``.
    first_id:
        Device id of canary 0 (the number of real devices).
    source:
        The run's noise source (secret).
    threat_model:
        The estimate reported first.
    delta:
        The run's ``delta``.
    canary_norm:
        Norm of a canary update; ``None``: the round's clip bound (1.0 without one).
    examples:
        Example count a canary reports (matters only for example-weighted strategies).
    """

    def __init__(
        self,
        count: int,
        *,
        num_params: int,
        first_id: int,
        source: NormalSource,
        threat_model: str,
        delta: float,
        canary_norm: float | None = None,
        examples: int = 1,
    ) -> None:
        if count < 2:
            raise ValueError(f"need at least 2 canaries, got {count}")
        if threat_model not in THREAT_MODELS:
            raise ValueError(f"threat model must be one of {THREAT_MODELS}, got {threat_model!r}")
        self.count = count
        self.first_id = first_id
        self.threat_model = threat_model
        self.delta = delta
        self.canary_norm = canary_norm
        self.examples = max(1, int(examples))
        self.directions = canary_directions(source, 2 * count, num_params)
        self.contributions = np.zeros(count, dtype=np.int64)
        self.round_cosines: list[np.ndarray] = []
        self.initial: torch.Tensor | None = None

    def rekey(self, source: NormalSource) -> None:
        """Redraw the directions from ``source`` (a run whose key is replaced, e.g. on resume)."""
        self.directions = canary_directions(source, 2 * self.count, self.directions.shape[1])

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.first_id, self.first_id + self.count, dtype=np.int64)

    def split(self, cohort: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(real devices, canary devices)`` of a cohort."""
        cohort = np.asarray(cohort, dtype=np.int64)
        is_canary = cohort >= self.first_id
        return cohort[~is_canary], cohort[is_canary]

    def norm(self, clip_norm: float | None) -> float:
        if self.canary_norm is not None:
            return self.canary_norm
        return float(clip_norm) if clip_norm is not None else 1.0

    def chunk(self, round: int, canary_ids: np.ndarray, clip_norm: float | None) -> CohortChunk:
        """The canaries' reports for ``round``: ``norm * c_i``, validated by the server like any."""
        ids = np.asarray(canary_ids, dtype=np.int64)
        rows = torch.from_numpy(ids - self.first_id)
        deltas = (self.directions.index_select(0, rows) * self.norm(clip_norm)).contiguous()
        m = len(ids)
        return CohortChunk(
            device_ids=ids,
            deltas=deltas,
            num_examples=torch.full((m,), self.examples, dtype=torch.int64),
            losses=torch.full((m,), math.nan, dtype=torch.float32),  # not trained: no loss
            rounds=np.full(m, round, dtype=np.int64),
        )

    def start(self, params: torch.Tensor) -> None:
        """Remember ``theta_0`` (before the first round)."""
        if self.initial is None:
            self.initial = params.detach().clone()

    def record_round(self, before: torch.Tensor, after: torch.Tensor, accepted: np.ndarray) -> None:
        """Count accepted canary contributions; keep the round's cosines for "all-iterates"."""
        accepted = np.asarray(accepted, dtype=np.int64)
        mine = accepted[accepted >= self.first_id] - self.first_id
        self.contributions[mine] += 1
        self.round_cosines.append(cosines(after - before, self.directions))

    # -- estimates -----------------------------------------------------------------------------
    def statistics(self, params: torch.Tensor, threat_model: str) -> tuple[np.ndarray, np.ndarray]:
        return _statistics(self.directions, self.initial, params, self.round_cosines, self.count, threat_model)

    def estimate(self, params: torch.Tensor, threat_model: str | None = None, *, num_bootstrap: int = 200) -> Any:
        tm = threat_model or self.threat_model
        ins, out = self.statistics(params, tm)
        return estimate_epsilon(ins, out, dim=self.directions.shape[1], delta=self.delta, threat_model=tm, num_bootstrap=num_bootstrap)

    def quick_epsilon(self, params: torch.Tensor) -> float:
        """Point estimate of the configured threat model (no interval): the progress output."""
        return float(self.estimate(params, num_bootstrap=0).epsilon)

    def report(self, params: torch.Tensor, *, formal: dict[str, Any]) -> dict[str, Any]:
        """``summary.json["audit"]``: both threat models, the configured one first."""
        return audit_report(
            {tm: self.estimate(params, tm) for tm in THREAT_MODELS},
            threat_model=self.threat_model,
            canaries=self.count,
            contributions=self.contributions,
            formal=formal,
            public=True,
        )

    # -- persistence ---------------------------------------------------------------------------
    def save(self, run_dir: str | Path, params: torch.Tensor) -> Path:
        """Write ``secret/canaries.pt`` (directions, theta_0, per-round cosines; mode 0600)."""
        assert self.initial is not None
        blob = {
            "format": _FORMAT,
            "count": self.count,
            "threat_model": self.threat_model,
            "delta": self.delta,
            "directions": self.directions,
            "initial": self.initial,
            "round_cosines": np.stack(self.round_cosines) if self.round_cosines else np.zeros((0, 2 * self.count)),
            "contributions": self.contributions,
        }
        buf = io.BytesIO()
        torch.save(blob, buf)
        path = secret_path(run_dir, CANARY_FILE)
        write_private(path, buf.getvalue())
        return path

    def state_dict(self) -> dict[str, Any]:
        return {
            "contributions": self.contributions.copy(),
            "round_cosines": np.stack(self.round_cosines) if self.round_cosines else None,
            "initial": None if self.initial is None else self.initial.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.contributions = np.asarray(state["contributions"], dtype=np.int64).copy()
        rows = state["round_cosines"]
        self.round_cosines = [] if rows is None else [np.asarray(r, dtype=float) for r in rows]
        init = state["initial"]
        self.initial = None if init is None else torch.as_tensor(init).clone()


def build_canaries(scenario: Scenario, data: FederatedData, num_params: int, source: Any) -> CanaryClients | None:
    """The run's canary clients (``[audit] canaries``), or ``None``."""
    cfg = scenario.audit
    if cfg.canaries == 0:
        return None
    try:
        check_canaries_fit_population(cfg.canaries, data.num_devices)
    except ScenarioError as exc:
        raise exc.with_source(scenario.source or "scenario") from None
    sample = np.linspace(0, data.num_devices - 1, num=min(data.num_devices, 1000)).astype(np.int64)
    examples = int(round(float(np.mean([data.num_examples(int(d)) for d in sample]))))
    return CanaryClients(
        cfg.canaries,
        num_params=num_params,
        first_id=data.num_devices,
        source=source,
        threat_model=cfg.threat_model,
        delta=scenario.privacy.delta,
        canary_norm=cfg.canary_norm,
        examples=examples,
    )


class CanaryCallback(RoundCallback):
    """The audit as a round callback: canary clients join the population, their updates are made
    by the server and summed into the round's release, and the run reports the empirical
    estimate (a row's ``audit_epsilon``, ``summary.json["audit"]``, ``secret/canaries.pt``).

    Its checkpoint state is under ``"audit"``; the canary directions come from the run's key
    (:meth:`on_key` redraws them when a resume reads the key back).
    """

    state_key = "audit"
    keyed = True

    def __init__(self, clients: CanaryClients) -> None:
        #: the canary clients (directions, contributions, per-round cosines)
        self.clients = clients
        self.extra_devices = clients.count

    def on_key(self, noise: Any) -> None:
        self.clients.rekey(noise)

    def split_cohort(self, round: int, cohort: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        real, canary_ids = self.clients.split(cohort)
        return real, np.asarray(canary_ids, dtype=np.int64)

    def server_reports(self, round: int, own: np.ndarray, clip_norm: float | None) -> CohortChunk | None:
        return self.clients.chunk(round, own, clip_norm) if len(own) else None

    def before_aggregate(self, round: int, params: torch.Tensor) -> None:
        self.clients.start(params)

    def after_aggregate(self, round: int, before: torch.Tensor, after: torch.Tensor, accepted: np.ndarray) -> None:
        self.clients.record_round(before, after, accepted)

    def on_row(self, row: dict[str, Any], params: torch.Tensor) -> None:
        row["audit_epsilon"] = self.clients.quick_epsilon(params)

    def on_summary(self, summary: dict[str, Any], params: torch.Tensor, rounds_done: int) -> None:
        if rounds_done > 0:
            summary["audit"] = self.clients.report(params, formal={"rho": summary["rho"], "epsilon": summary["epsilon"]})

    def save(self, run_dir: Path, params: torch.Tensor, rounds_done: int) -> None:
        if rounds_done > 0:
            self.clients.save(run_dir, params)

    def state_dict(self) -> dict[str, Any]:
        return self.clients.state_dict()

    def load_state_dict(self, state: Any) -> None:
        if state is not None:
            self.clients.load_state_dict(state)


def _statistics(
    directions: torch.Tensor,
    initial: torch.Tensor | None,
    params: torch.Tensor,
    round_cosines: list[np.ndarray] | np.ndarray,
    count: int,
    threat_model: str,
) -> tuple[np.ndarray, np.ndarray]:
    if threat_model == "final-model":
        if initial is None:
            raise ValueError("theta_0 unknown")
        stat = cosines(params - initial, directions)
    else:
        if len(round_cosines) == 0:
            raise ValueError("no rounds recorded")
        stat = np.max(np.asarray(round_cosines), axis=0)
    return stat[:count], stat[count:]


def audit_report(
    estimates: dict[str, Any],
    *,
    threat_model: str,
    canaries: int,
    contributions: np.ndarray,
    formal: dict[str, Any],
    public: bool = False,
) -> dict[str, Any]:
    """The ``audit`` block of ``summary.json`` (``public``) / ``fedsim audit --json``.

    The public block leaves out how often canaries were selected: with fixed-size cohorts that
    count tells how many real devices took part, which DP runs do not publish.
    """
    main = estimates[threat_model]
    contributions = np.asarray(contributions)
    out = {
        "threat_model": threat_model,
        "canaries": canaries,
        "held_out": canaries,
        "epsilon": main.epsilon,
        "ci": [main.ci_low, main.ci_high],
        "confidence": main.confidence,
        "lower_bound": main.lower_bound,
        "delta": main.delta,
        "formal_rho": formal.get("rho"),
        "formal_epsilon": formal.get("epsilon"),
        "canary_contributions": {
            "mean": float(contributions.mean()) if len(contributions) else 0.0,
            "max": int(contributions.max()) if len(contributions) else 0,
            "never": int((contributions == 0).sum()),
        },
        "estimates": {tm: est.to_dict() for tm, est in estimates.items()},
    }
    if public:
        del out["canary_contributions"]
    return out


# ----------------------------------------------------------------------------------------------
# fedsim audit RUN_DIR


def load_canaries(run_dir: str | Path) -> dict[str, Any]:
    """Read ``RUN_DIR/secret/canaries.pt`` (:class:`AuditError` with one line when impossible)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditError(f"{run_dir}: no such run directory")
    if not (run_dir / "config.toml").is_file():
        raise AuditError(f"{run_dir}: not a run directory (no config.toml)")
    path = run_dir / SECRET_DIR / CANARY_FILE
    if not path.is_file():
        raise AuditError(
            f"{run_dir}: the run has no saved canaries ({SECRET_DIR}/{CANARY_FILE}); run the scenario with "
            "[audit] canaries = N (N >= 2) to audit it"
        )
    try:
        blob = torch.load(path, weights_only=False)
    except Exception as exc:
        raise AuditError(f"{path}: cannot read the canary file ({type(exc).__name__})") from None
    needed = {"format", "count", "threat_model", "delta", "directions", "initial", "round_cosines", "contributions"}
    if not isinstance(blob, dict) or not needed <= set(blob) or blob["format"] != _FORMAT:
        raise AuditError(f"{path}: not a fedsim canary file (format {_FORMAT})")
    return blob


def audit_run(run_dir: str | Path, *, threat_model: str | None = None, num_bootstrap: int = 200) -> dict[str, Any]:
    """Recompute a finished run's empirical privacy estimates from its saved canaries.

    Final-model statistics are recomputed from the canary directions, ``theta_0`` and the
    released final model (``model.pt``); all-iterates statistics from the per-round cosines the
    run recorded between each round's model delta and every direction.
    """
    import json

    run_dir = Path(run_dir)
    blob = load_canaries(run_dir)
    model_path = run_dir / "model.pt"
    if not model_path.is_file():
        raise AuditError(f"{run_dir}: no model.pt (the run did not finish)")
    try:
        params = torch.load(model_path, weights_only=False)["flat"]
    except Exception as exc:
        raise AuditError(f"{model_path}: cannot read the model ({type(exc).__name__})") from None
    directions = blob["directions"]
    if params.shape != directions.shape[1:]:
        raise AuditError(f"{model_path}: model has {params.numel()} parameters, the canaries {directions.shape[1]}")
    formal: dict[str, Any] = {}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            formal = {"rho": summary.get("rho"), "epsilon": summary.get("epsilon")}
        except (OSError, ValueError):
            formal = {}
    tm = threat_model or blob["threat_model"]
    count = int(blob["count"])
    estimates = {}
    for name in THREAT_MODELS:
        ins, out = _statistics(directions, blob["initial"], params, blob["round_cosines"], count, name)
        estimates[name] = estimate_epsilon(
            ins, out, dim=directions.shape[1], delta=float(blob["delta"]), threat_model=name, num_bootstrap=num_bootstrap
        )
    return audit_report(estimates, threat_model=tm, canaries=count, contributions=blob["contributions"], formal=formal)


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable audit report."""
    lines = []
    formal_eps, formal_rho = report.get("formal_epsilon"), report.get("formal_rho")
    formal = "formal: none (not a DP run)"
    if formal_eps is not None:
        formal = f"formal: epsilon = {formal_eps:.4g}" + (f", rho = {formal_rho:.4g} zCDP" if formal_rho is not None else "")
    c = report["canary_contributions"]
    lines.append(
        f"{report['canaries']} canaries inserted (mean {c['mean']:.2f} contributions, {c['never']} never selected), "
        f"{report['held_out']} held out; delta = {report['delta']:.3g}; {formal}"
    )
    for tm, est in report["estimates"].items():
        mark = "*" if tm == report["threat_model"] else " "
        lines.append(
            f"{mark} {tm:<13} empirical epsilon = {est['epsilon']:.4g}  "
            f"[{est['ci_low']:.4g}, {est['ci_high']:.4g}] ({est['confidence']:.0%} CI), "
            f"threshold-test lower bound {est['lower_bound']:.4g}"
        )
    lines.append("empirical epsilon: the canary adversary's epsilon (an estimate, not a guarantee); see docs/audit.md")
    return "\n".join(lines)
