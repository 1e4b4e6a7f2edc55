"""The round owner: the one piece of code that begins and ends every round of a run.

The in-process engine (:class:`~fedsim.engine.simulation.Simulation`, with its in-process or
Ray :class:`~fedsim.engine.executors.CohortExecutor`) and the Flower bridge
(:class:`fedsim.flower.strategy.FedsimStrategy`) drive rounds through :class:`RoundOwner`, so
a round is selected, validated, aggregated, accounted and recorded the same way whoever trains
the clients:

:meth:`RoundOwner.begin`
    1. the strategy's privacy event for the round; the run stops *before* a round whose event
       would exceed ``[privacy] max-rho`` / ``max-epsilon``;
    2. devices check in (availability model + their own participation memory), restricted to
       the devices a deployment can reach;
    3. the strategy selects the cohort and configures the clients (clip bound, learning rate).
    The result is a :class:`RoundPlan`.
:meth:`RoundOwner.accumulator`
    the server-side validation and streaming sum the round's reports are folded into (by the
    executor, in cohort order).
:meth:`RoundOwner.end`
    4. devices and the server's participation ledger record the round;
    5. the strategy aggregates (DP strategies: their mechanism adds the noise); the privacy event
       is recorded in the ledger and the accountant reports rho / epsilon;
    6. the global model is evaluated on the held-out split; the round's metrics row is built.
:meth:`RoundOwner.commit`
    7. a keyed run records the round in its release record (:mod:`fedsim.engine.releases`,
       fsynced; a re-executed round must reproduce what it released), then the row is appended
       to ``metrics.jsonl``, the progress bar moves, and a checkpoint is written when one is due.

``begin`` / ``end`` / ``commit`` take and return plain values; the run's state (parameters,
strategy, population and ledgers, privacy ledger, rejection counts, metrics, next round) lives in
the owner and is saved and restored with :meth:`RoundOwner.state_dict` /
:meth:`RoundOwner.load_state_dict` (``fedsim.engine.checkpoint`` only serialises it);
:meth:`RoundOwner.restore` is the one path from a checkpoint back into a run.

What the owner delegates: the run's files to its :class:`~fedsim.engine.recorder.RunRecorder`
(``summary.json`` written once, with the summary hooks' parts), its key file to a
:class:`~fedsim.engine.keystore.KeyStore`, and what a plug-in adds to every round (the audit's
canary clients) to its :class:`~fedsim.engine.callbacks.RoundCallback` list
(:attr:`RoundOwner.callbacks`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim import seeds, workloads
from fedsim.builders import (
    build_availability,
    build_data,
    build_scenario_model,
    build_strategy,
    build_trainer,
    evaluate,
)
from fedsim.data.fingerprint import data_fingerprint, fingerprint_diff
from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.engine.allocator import keep_freed_memory
from fedsim.engine.callbacks import RoundCallback
from fedsim.engine.canaries import CanaryCallback, CanaryClients, build_canaries
from fedsim.engine.checkpoint import (
    CHECKPOINT_DIR,
    Checkpointer,
    CheckpointError,
    CheckpointKey,
    comparable,
    default_scenario_dict,
    list_checkpoints,
    restore_metrics_log,
    scenario_diff,
)
from fedsim.engine.keystore import KeyStore, load_key
from fedsim.engine.recorder import PRIVATE_DIR, RunFiles, RunRecorder
from fedsim.engine.releases import (
    RELEASES_FILE,
    PriorReport,
    ReleaseError,
    ReleaseRecord,
    prior_report,
    release_digest,
)
from fedsim.engine.report import privacy_figures, run_summary
from fedsim.engine.rundir import RunDir, metrics_line
from fedsim.errors import FedsimError
from fedsim.models import get_flat, num_params, set_flat
from fedsim.population import Population
from fedsim.privacy.csprng import GENERATOR
from fedsim.privacy.events import ClippedCountEvent, SampledGaussianEvent
from fedsim.privacy.noise import (
    KEY_FILE,
    TAG_SELECT,
    NoiseKey,
    NoiseSource,
    new_run_id,
)
from fedsim.scenario import Scenario
from fedsim.strategy import StrategyContext
from fedsim.tracking import open_tracker
from fedsim.types import TrainConfig, UpdateBatch

__all__ = ["NON_FINITE", "PRIVATE_DIR", "WITHHELD_KEYS", "RoundOwner", "RoundPlan", "RunResult", "build_canaries", "progress_postfix"]

#: How :attr:`RoundOwner.stopped_reason` starts when a run stopped because its model is no
#: longer finite (NaN / inf parameters or held-out loss): the released rounds are garbage.
NON_FINITE = "non-finite model"
#: Checkpoint keys beside the round owner's :meth:`RoundOwner.state_dict`: the run log's position,
#: and a Flower job's pending row and bridge counts.
CHECKPOINT_EXTRAS = ("metrics", "pending_row", "flower")
#: ``metrics.jsonl`` keys a DP run publishes as ``null`` (exact values: ``private/diagnostics.jsonl``).
WITHHELD_KEYS = ("train_loss", "clients", "eligible", "rejected")


def read_prior_run(run: Path) -> ReleaseRecord:
    """The release record of an earlier in-process run (``[privacy] prior-runs``), authenticated
    with that run's key (its ``secret/noise.key``, else the key file its ``config.toml`` names).

    Errors (:class:`~fedsim.engine.checkpoint.CheckpointError`) name the run and what is missing.
    """
    where = f"[privacy] prior-runs: {run}"
    record_path = run / PRIVATE_DIR / RELEASES_FILE
    if not record_path.exists():
        raise CheckpointError(
            f"{where}: no release record ({PRIVATE_DIR}/{RELEASES_FILE}): not a DP or audited fedsim "
            "run directory, or one written by an older fedsim"
        )
    key_path = run / KEY_FILE
    if not key_path.exists():
        try:
            config = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            config = {}
        named = config.get("privacy", {}).get("noise-key-file") if isinstance(config.get("privacy"), dict) else None
        if not named:
            raise CheckpointError(f"{where}: its noise key ({KEY_FILE}) is missing: its release record cannot be authenticated")
        key_path = Path(named)
    return ReleaseRecord.open(record_path, load_key(key_path, where), key_file=f"{where}: {key_path}")


@dataclass
class RunResult:
    """What a finished (or budget-stopped) run produced."""

    run_dir: Path | None
    params: torch.Tensor
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    ledger: Any | None = None
    rejected: dict[str, int] = field(default_factory=dict)
    #: DP runs: the exact per-round values withheld from ``metrics`` (``private/diagnostics.jsonl``)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class RoundPlan:
    """What :meth:`RoundOwner.begin` decided for one round.

    Attributes
    ----------
    round:
        0-based round index.
    event:
        The strategy's privacy event for the round (``None`` for non-DP strategies): the first
        of :attr:`events`.
    params:
        The global model the round's clients start from.
    eligible:
        Devices that checked in and may contribute.
    cohort:
        The selected devices the executor trains (sorted; canary clients excluded).
    config:
        The clients' instructions (``TrainConfig``, with the round and clip bound).
    canaries:
        Selected devices a round callback stands in for (:meth:`RoundCallback.split_cohort
        <fedsim.engine.callbacks.RoundCallback.split_cohort>`; the audit's canary clients): their
        updates are made by the server (:meth:`RoundOwner.accumulator`), not trained.
    events:
        Every privacy event the round records, in order (adaptive clipping: the update's and
        the clipped count's); empty for non-DP strategies.
    """

    round: int
    event: Any
    params: torch.Tensor
    eligible: np.ndarray
    cohort: np.ndarray
    config: TrainConfig
    canaries: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    events: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not self.events and self.event is not None:
            object.__setattr__(self, "events", (self.event,))


def progress_postfix(row: dict[str, Any]) -> dict[str, str]:
    """The progress bar's per-round figures: ``acc``, ``loss``, ``rho``, ``eps`` (the run's), ``eq_rho``
    (the deployment-equivalent rho, ``[privacy] equivalent-cohort``), ``emp_eps``, ``clients``."""
    out = {}
    for key, label in (
        ("accuracy", "acc"), ("loss", "loss"), ("rho", "rho"), ("epsilon", "eps"),
        ("equivalent_rho", "eq_rho"), ("audit_epsilon", "emp_eps"),
    ):
        if row.get(key) is not None:
            out[label] = f"{row[key]:.4g}"
    if row.get("clients") is not None:
        out["clients"] = str(row["clients"])
    return out


class RoundOwner:
    """A run's state and the steps that begin and end its rounds.

    Parameters
    ----------
    scenario:
        The validated scenario.
    run_dir:
        Where to write the run directory; ``None`` writes nothing (tests, benchmarks).
    checkpoints:
        Write checkpoints as ``[checkpoint]`` says (needs ``run_dir``).
    noise_key:
        The run's secret noise key. Default: the scenario's ``[privacy] noise-key-file`` if it
        names one, else a fresh key from :mod:`secrets` (kept as ``secret/noise.key`` in the run
        directory of a DP run, mode 0600; a resume reads it back).
    secret_cohort:
        Whether who is sampled stays hidden from the adversary (the in-process engine: the
        cohort never leaves the server). ``False`` (Flower: every sampled device gets its own
        message) records a Poisson-sampled round without amplification
        (:meth:`~fedsim.privacy.events.SampledGaussianEvent.unamplified`): the ledger, rho,
        epsilon and the budget check then hold without a secret cohort.
    record_releases:
        Keep the run's release record in ``private/releases.jsonl`` (a keyed run with a run
        directory). ``False``: the caller keeps it elsewhere (a Flower job's state directory) and
        sets :attr:`releases` itself.

    The run's public id (:attr:`run_id`: ``[privacy] run-id``, else 128 fresh bits from
    :mod:`secrets`) prefixes every noise and sampling word, so runs under one key never share
    noise; a DP or audited run records it in ``config.toml`` (the scenario it writes) and
    ``summary.json``.

    Privacy of what a DP run publishes (``docs/threat-model.md``): the key never enters
    ``config.toml``, ``metrics.jsonl``, ``summary.json``, checkpoints or logs; cohort selection
    draws from the key, not the public seed; per-round ``train_loss`` and counts are withheld
    from the public files (``null``) and written to ``private/diagnostics.jsonl``.
    """

    def __init__(
        self,
        scenario: Scenario,
        *,
        run_dir: str | Path | None = None,
        checkpoints: bool = True,
        noise_key: NoiseKey | None = None,
        secret_cohort: bool = True,
        record_releases: bool = True,
    ) -> None:
        self.scenario = scenario
        self.secret_cohort = secret_cohort
        self.record_releases = record_releases
        #: the run's release record (:mod:`fedsim.engine.releases`), once the run starts or resumes
        self.releases: ReleaseRecord | None = None
        #: what earlier runs released on the same people (``[privacy] prior-runs``, Flower's
        #: ``prior-jobs``): added to this run's report and budget
        self.prior: PriorReport | None = None
        #: set by a resume: the run continues (its release record and key are kept)
        self.resumed = False
        self._data_fingerprint: dict[str, Any] | None = None
        self.run_dir = RunDir(run_dir) if run_dir is not None else None
        #: writes the run's files, public and private (fedsim.engine.recorder)
        self.recorder = RunRecorder(self.run_dir)
        torch.set_num_threads(scenario.engine.threads)
        keep_freed_memory()  # reuse freed heap memory: see fedsim.engine.allocator
        self.data = build_data(scenario)
        self.model = build_scenario_model(
            scenario, self.data, seed=seeds.derived_seed(scenario.seed, seeds.STREAM_MODEL_INIT), init=True
        )
        self.params = get_flat(self.model)
        #: a warm start's parameters ([model] init): summary.json["init"] reports how they evaluate
        self.initial_params = self.params.clone() if scenario.model.init is not None else None
        self.strategy = build_strategy(scenario)
        self.base_config = TrainConfig(
            round=0,
            lr=scenario.client.lr,
            local_epochs=scenario.client.local_epochs,
            batch_size=scenario.client.batch_size,
        )
        # the trainer gets its own copy of the model so evaluation never disturbs it
        self.trainer = build_trainer(scenario, build_scenario_model(scenario, self.data), self.data)
        #: where client training and the server's streaming sum run ([engine] device)
        self.device = self.trainer.set_device(scenario.engine.torch_device())
        if scenario.engine.device == "cuda" and self.device.type != "cuda":
            raise FedsimError(
                f'engine.device = "cuda": trainer {scenario.client.trainer!r} trains on the CPU only; use "auto" or "cpu"'
            )
        fixed = scenario.noise_key_path
        if noise_key is not None:
            self.key_origin = "given"
        elif fixed is not None:
            noise_key = load_key(fixed, "[privacy] noise-key-file")
            self.key_origin = "fixed"
        else:
            noise_key = NoiseKey.generate()
            self.key_origin = "secret"
        #: the run's public id: it enters every noise and sampling word (runs under one key differ)
        self.run_id = scenario.privacy.run_id or new_run_id()
        #: plug-ins of every round (fedsim.engine.callbacks): the audit's canary clients, ...
        self.callbacks: list[RoundCallback] = []
        self.set_key(noise_key)
        #: a DP run: its strategy records privacy events (decides what is published)
        self.private = self.strategy.privacy_event(round=0) is not None
        # [audit]: canary clients are extra devices (ids after the real ones), see fedsim.engine.canaries
        canaries = build_canaries(scenario, self.data, self.params.numel(), self.noise)
        if canaries is not None:
            self.callbacks.append(CanaryCallback(canaries))
        if self.keyed and not scenario.privacy.run_id:
            # the resolved scenario (config.toml, checkpoints) records the id a replay needs
            self.scenario = scenario = replace(scenario, privacy=replace(scenario.privacy, run_id=self.run_id))
        extra = sum(cb.extra_devices for cb in self.callbacks)
        limit = self.strategy.participation_limit()
        self.population = Population(
            self.data,
            build_availability(scenario, extra_devices=extra, num_devices=self.data.num_devices),
            limit,
            extra_devices=extra,
        )
        # a DP-SGD trainer publishes its example-level figure for the participations the
        # configuration allows (never the ones observed: they follow the secret sampling)
        k = limit.max_participations if limit is not None else None
        self.trainer.set_participation_bound(*((k, "strategy") if k is not None else (scenario.rounds, "rounds")))
        self.ledger: Any | None = None
        self.accountant: Any | None = None
        #: the deployment's events, one per recorded round ([privacy] equivalent-cohort)
        self.equivalent_ledger: Any | None = None
        self.rejected: Counter[str] = Counter()
        self.metrics: list[dict[str, Any]] = []
        self.next_round = 0
        self.stopped_reason = "completed"
        self.checkpointer: Checkpointer | None = None
        if checkpoints and self.run_dir is not None and scenario.checkpoint.every > 0:
            self.checkpointer = Checkpointer(
                self.run_dir.path / CHECKPOINT_DIR, scenario.checkpoint.every, scenario.checkpoint.keep,
                auth=self.checkpoint_auth,
            )
        self.progress_bar: Any = None
        #: [log]: TensorBoard / MLflow, called with each committed row and the summary (fedsim.tracking)
        self.tracker = open_tracker(self.scenario, self.run_dir)

    # -- the secret key ---------------------------------------------------------------------------
    def set_key(self, key: NoiseKey) -> None:
        """Key the run: the strategy's noise source (set up afresh) and the trainer's private randomness."""
        #: the run's secret noise source (the strategy's mechanism and the canaries draw from it)
        self.noise_source = NoiseSource(key, self.run_id)
        self.noise = self.noise_source
        self.strategy.setup(
            StrategyContext(
                num_params=num_params(self.model),
                num_rounds=self.scenario.rounds,
                num_devices=self.data.num_devices,
                clients_per_round=self.scenario.clients_per_round,
                seed=self.scenario.seed,
                base_train_config=self.base_config,
                noise=self.noise_source,
            )
        )
        self.trainer.set_private_source(self.noise_source)
        for cb in self.callbacks:  # e.g. the canary directions, drawn from the key
            cb.on_key(self.noise_source)

    @property
    def canaries(self) -> CanaryClients | None:
        """The audit's canary clients (``[audit] canaries``; its :class:`CanaryCallback`), or ``None``."""
        return next((cb.clients for cb in self.callbacks if isinstance(cb, CanaryCallback)), None)

    @property
    def key_path(self) -> Path | None:
        """Where this run keeps its secret key (``None`` without a run directory)."""
        return self.run_dir.path / KEY_FILE if self.run_dir is not None else None

    @property
    def keyed(self) -> bool:
        """Whether what the run releases depends on its noise key: a DP run, or an audited one
        (its canary directions are drawn from the key)."""
        return self.private or any(cb.keyed for cb in self.callbacks)

    @property
    def key_store(self) -> KeyStore | None:
        """The run's own key file (``secret/noise.key``): a keyed run whose key was drawn for it,
        with a run directory; ``None`` otherwise (a fixed key file, a given key, no key needed)."""
        if not (self.keyed and self.key_origin == "secret" and self.run_dir is not None):
            return None
        return KeyStore(self.run_dir.path / KEY_FILE)

    def save_key(self) -> None:
        """Write the secret key of a fresh keyed run to ``secret/noise.key`` (0600, directory 0700)."""
        store = self.key_store
        if store is not None:
            store.save(self.noise_source.key)

    def reload_key(self) -> None:
        """Before a resume: read a DP run's secret key back, so replayed rounds add the same noise.

        Without it the run refuses to resume (:class:`~fedsim.engine.checkpoint.CheckpointError`).
        """
        store = self.key_store
        if store is None:
            return
        self.set_key(
            store.reload(
                where="--resume",
                missing=(
                    "the run's secret noise key is missing, cannot resume: replayed rounds "
                    "would add fresh noise and release a second noisy view of the same data "
                    "(restore the key file, or start a new run in another directory)"
                ),
            )
        )
        if self.checkpointer is not None:
            self.checkpointer.auth = self.checkpoint_auth

    @property
    def checkpoint_auth(self) -> CheckpointKey | None:
        """How the run's checkpoints are authenticated: a MAC under a key derived from the noise
        key for a keyed run, ``None`` (an unkeyed checksum) for the others."""
        return CheckpointKey.of(self.noise_source.key) if self.keyed else None

    @property
    def key_file(self) -> str:
        """Where the run's key comes from, in words (for messages)."""
        if self.key_origin == "fixed":
            return f"[privacy] noise-key-file {self.scenario.noise_key_path}"
        if self.key_origin == "secret" and self.key_path is not None:
            return str(self.key_path)
        return "the given noise key"

    # -- the data and the release record ------------------------------------------------------
    @property
    def data_fingerprint(self) -> dict[str, Any]:
        """The run's :func:`~fedsim.data.fingerprint.data_fingerprint` (computed once)."""
        if self._data_fingerprint is None:
            self._data_fingerprint = data_fingerprint(self.data)
        return self._data_fingerprint

    @property
    def releases_path(self) -> Path | None:
        """``private/releases.jsonl``: the release record of a keyed run with a run directory."""
        if not (self.keyed and self.record_releases and self.run_dir is not None):
            return None
        return self.run_dir.path / PRIVATE_DIR / RELEASES_FILE

    def run_identity(self) -> dict[str, Any]:
        """What a release record's header says the run is: scenario name and run id."""
        return {"scenario": self.scenario.name, "run_id": self.run_id}

    def create_releases(self, path: Path, *, run: dict[str, Any] | None = None) -> ReleaseRecord:
        """Start the release record of a new run at ``path`` (its header: key and data fingerprints)."""
        self.releases = ReleaseRecord.create(
            path, self.noise_source.key, data=self.data_fingerprint, run=run if run is not None else self.run_identity()
        )
        return self.releases

    def open_releases(self, path: Path, *, where: str, restart: str | None = None) -> ReleaseRecord:
        """Read back the release record at ``path`` before continuing the run.

        Refuses (:class:`~fedsim.engine.releases.ReleaseError`, one line) a record signed under
        another key (a swapped key file), another run id, data that differ from those the run
        started on, and a public run log with more rows than the record holds (a record cut back
        or replaced). ``restart`` replaces the refusals' advice on starting anew.
        """
        record = ReleaseRecord.open(path, self.noise_source.key, key_file=self.key_file)
        if restart is not None:
            record.restart = restart
        started = record.header.get("run", {}).get("run_id")
        if started is not None and started != self.run_id:
            raise ReleaseError(
                f"{where}: the run id ({self.run_id}) is not the one this run was started with ({started}, "
                f"in {path}): re-executed rounds would add other noise to rounds already released; "
                "resume with the recorded run id"
            )
        record.check_data(self.data_fingerprint, where=where)
        rows = self.recorder.logged_rows()
        if rows > record.released:
            raise ReleaseError(
                f"{self.run_dir.metrics_path if self.run_dir else 'the run log'} holds {rows} rounds but "
                f"{path} records {record.released} released: the record was cut back or replaced; "
                "cannot tell what was published"
            )
        self.releases = record
        return record

    def resume_releases(self) -> int:
        """Before an in-process resume: the run's release record, read back; the rounds released.

        A keyed run that has published rounds (rows in ``metrics.jsonl``, or checkpoints) but has
        no record is refused: which rounds were released cannot be told. Other runs: 0.
        """
        path = self.releases_path
        if path is None:
            return 0
        if not path.exists():
            directory = self.run_dir.path / CHECKPOINT_DIR if self.run_dir is not None else None
            if self.recorder.logged_rows() or (directory is not None and list_checkpoints(directory)):
                raise ReleaseError(
                    f"{path}: the run's release record is missing, but the run has published rounds; "
                    "cannot tell which rounds were released (a run started by an older fedsim, or the "
                    "file was removed): restore it, or start a new run in another directory"
                )
            self.create_releases(path)
            return 0
        return self.open_releases(path, where="--resume").released

    def load_prior(self) -> PriorReport | None:
        """``[privacy] prior-runs``: what those runs released, from their release records."""
        paths = self.scenario.prior_run_paths
        if not paths:
            return None
        records = [(str(run), read_prior_run(run)) for run in paths]
        self.prior = prior_report(records, delta=self.scenario.privacy.delta)
        return self.prior

    def released_event(self, round_no: int) -> dict[str, Any] | list[dict[str, Any]] | None:
        """The privacy event (as a dict) the ledger recorded for 1-based ``round_no``, a list of
        them when the round recorded several (adaptive clipping), or ``None``."""
        if self.ledger is None or not len(self.ledger):
            return None
        from fedsim.privacy.events import event_to_dict

        found = []
        for r, event in reversed(self.ledger.events()):
            if r != round_no - 1:
                break
            found.append(event_to_dict(event))
        found.reverse()
        if not found:
            return None
        return found[0] if len(found) == 1 else found

    def selection_rng(self, round: int) -> np.random.Generator:
        """The cohort-selection generator: from the secret key in a DP run, the public seed otherwise."""
        if self.private:
            return self.noise_source.generator((TAG_SELECT, round))
        return seeds.round_rng(self.scenario.seed, seeds.STREAM_SELECTION, round)

    @property
    def diagnostics(self) -> list[dict[str, Any]]:
        """A DP run's exact per-round values withheld from ``metrics.jsonl`` (:attr:`recorder`'s)."""
        return self.recorder.diagnostics

    # -- privacy ------------------------------------------------------------------------------
    @property
    def noise_multiplier(self) -> float | None:
        """The DP strategy's noise multiplier (noise std / clip norm; solved from ``target-rho``
        where given), ``None`` for a run without DP or a strategy that does not say."""
        if not self.private:
            return None
        if self.equivalent is not None:  # the run's own: z n / N, set up by the strategy
            return float(self.strategy.mechanism.noise_multiplier)
        z = self.strategy.calibrated_noise_multiplier(num_rounds=self.scenario.rounds)
        return None if z is None else float(z)

    @property
    def equivalent(self) -> Any | None:
        """The deployment the run's noise is equivalent to (``[privacy] equivalent-cohort``), or ``None``."""
        return self.strategy.equivalent if self.private else None

    def equivalent_report(self) -> Any | None:
        """The deployment-equivalent guarantee after the rounds recorded so far (``None`` without
        ``equivalent-cohort``): the accountant on the deployment's events of those rounds
        (:meth:`fedsim.strategy.MechanismStrategy.equivalent_events`), a statement about that
        configuration, not about this run."""
        if self.equivalent is None:
            return None
        from fedsim.privacy.accountant import Accountant
        from fedsim.privacy.events import PrivacyLedger

        def rounds(ledger: Any) -> int:
            # the rounds a ledger covers (a round records several events with adaptive clipping)
            return 1 + max((r for r, _ in ledger), default=-1) if ledger is not None else 0

        done = rounds(self.ledger)
        if self.equivalent_ledger is None or rounds(self.equivalent_ledger) > done:
            self.equivalent_ledger = PrivacyLedger()
        for r in range(rounds(self.equivalent_ledger), done):
            for event in self.strategy.equivalent_events(round=r):
                self.equivalent_ledger.record(r, event)
        return Accountant(delta=self.scenario.privacy.delta).report(self.equivalent_ledger)

    def equivalent_summary(self) -> dict[str, Any] | None:
        """``summary.json["equivalent"]``: the deployment, its noise multiplier and guarantee."""
        report = self.equivalent_report()
        if report is None:
            return None
        from fedsim.privacy.equivalent import STATEMENT

        dep = self.equivalent
        return {
            "cohort": dep.cohort,
            "population": dep.population,
            "min_population": self.strategy.deployment_min_population,
            "noise_multiplier": self.strategy.deployment_noise_multiplier,
            "simulated_noise_multiplier": float(self.strategy.mechanism.noise_multiplier),
            **({} if self.strategy.deployment_count_noise_multiplier is None else {
                "count_noise_multiplier": self.strategy.deployment_count_noise_multiplier,
                "simulated_count_noise_multiplier": float(self.strategy.adaptive.count_noise_multiplier),
            }),
            "clients_per_round": self.scenario.clients_per_round,
            "rho": report.rho,
            "epsilon": report.epsilon,
            "epsilon_rdp": report.epsilon_rdp,
            "delta": report.delta,
            "statement": STATEMENT,
        }

    def privacy(self) -> tuple[Any, Any]:
        """Ledger and accountant, created on the first privacy event (non-DP runs need neither)."""
        if self.ledger is None:
            from fedsim.privacy.accountant import Accountant
            from fedsim.privacy.events import PrivacyLedger

            self.ledger = PrivacyLedger()
            self.accountant = Accountant(delta=self.scenario.privacy.delta)
        return self.ledger, self.accountant

    def round_event(self, round: int) -> Any:
        """The privacy event recorded for ``round``: the strategy's, unamplified where the cohort is known."""
        events = self.round_events(round)
        return events[0] if events else None

    def round_events(self, round: int) -> tuple[Any, ...]:
        """Every privacy event recorded for ``round`` (the strategy's), unamplified where the
        cohort is known."""
        events = tuple(self.strategy.privacy_events(round=round))
        if not self.secret_cohort:
            events = tuple(e.unamplified() if isinstance(e, SampledGaussianEvent | ClippedCountEvent) else e
                           for e in events)
        return events

    def budget_exceeded(self, round: int, event: Any) -> str | None:
        """Why recording ``event`` (or a tuple of events) for ``round`` would exceed the privacy
        budget, or ``None``."""
        cfg = self.scenario.privacy
        if event is None or event == () or (cfg.max_rho is None and cfg.max_epsilon is None):
            return None
        ledger, accountant = self.privacy()
        report = self.with_prior(accountant.report_with(ledger, round, event))
        if cfg.max_rho is not None and report.rho is not None and report.rho > cfg.max_rho:
            return f"privacy budget: round {round + 1} would reach rho={report.rho:.4g} > max-rho={cfg.max_rho:g}"
        if cfg.max_epsilon is not None and report.epsilon is not None and report.epsilon > cfg.max_epsilon:
            return (
                f"privacy budget: round {round + 1} would reach epsilon={report.epsilon:.4g} "
                f"> max-epsilon={cfg.max_epsilon:g}"
            )
        return None

    def with_prior(self, report: Any) -> Any:
        """``report`` with :attr:`prior`'s rho added (epsilon from the sum, without amplification).

        zCDP composes additively; the combined epsilon is the conversion of the summed rho, which
        is valid whatever each part's amplification was (and ignores it).
        """
        if self.prior is None or report is None or report.rho is None:
            return report
        from fedsim.privacy.accountant import PrivacyReport
        from fedsim.privacy.conversions import epsilon_from_rho, epsilon_rdp_from_rho

        rho = report.rho + self.prior.rho
        delta = report.delta
        return PrivacyReport(rho, epsilon_from_rho(rho, delta), epsilon_rdp_from_rho(rho, delta), delta, report.noise_multiplier)

    def non_finite(self, params: torch.Tensor) -> str | None:
        """Why the run must stop because ``params`` or the last held-out loss is NaN or inf, or ``None``.

        Training on from such a model only compounds it, and a privacy figure next to it would
        report a guarantee for garbage as if the run had worked.
        """
        done = len(self.metrics)
        if not bool(torch.isfinite(params).all()):
            what = "parameters hold NaN or inf"
        else:
            loss = self.metrics[-1].get("loss") if self.metrics else None
            if not (isinstance(loss, float) and not np.isfinite(loss)):
                return None
            what = f"held-out loss is {loss}"
        return (
            f"{NON_FINITE}: after round {done} the global model's {what} (a learning rate, clip "
            "bound or noise too large for the model?); the rounds after it were not run"
        )

    # -- a round ------------------------------------------------------------------------------
    def begin(
        self,
        round: int,
        *,
        params: torch.Tensor | None = None,
        reachable: Callable[[], np.ndarray] | None = None,
    ) -> RoundPlan | None:
        """Plan ``round``; ``None`` (and :attr:`stopped_reason` set) if the budget stops the run,
        or if the model the round would start from is not finite (:data:`NON_FINITE`).

        Parameters
        ----------
        params:
            The model the round starts from (default: the current global model).
        reachable:
            Called after the budget check: a boolean mask over devices that can be reached (a
            deployment's connected nodes); devices outside it are not eligible.
        """
        sc = self.scenario
        reason = self.non_finite(self.params if params is None else params)
        if reason is not None:
            self.stopped_reason = reason
            return None
        events = self.round_events(round)
        event = events[0] if events else None
        reason = self.budget_exceeded(round, events)
        if reason is not None:
            self.stopped_reason = reason
            return None
        mask = reachable() if reachable is not None else None
        eligible = self.population.check_in(round, seeds.round_rng(sc.seed, seeds.STREAM_AVAILABILITY, round))
        if mask is not None:
            eligible = eligible[mask[eligible]]
        # a DP run selects from its secret key, never the public seed
        cohort = self.strategy.select(round=round, eligible=eligible, rng=self.selection_rng(round))
        config = self.strategy.configure_client(round=round, base=replace(self.base_config, round=round))
        start = self.params if params is None else params
        cohort = np.asarray(cohort, dtype=np.int64)
        own: list[np.ndarray] = []
        for cb in self.callbacks:  # devices a callback stands in for are not trained
            cohort, mine = cb.split_cohort(round, cohort)
            own.append(np.asarray(mine, dtype=np.int64))
        if own:
            return RoundPlan(round, event, start, eligible, cohort, config, canaries=np.concatenate(own), events=events)
        return RoundPlan(round, event, start, eligible, cohort, config, events=events)

    def accumulator(self, plan: RoundPlan) -> UpdateAccumulator:
        """The server-side validation and streaming sum for ``plan``'s reports.

        The updates the round's callbacks make (:meth:`RoundCallback.server_reports
        <fedsim.engine.callbacks.RoundCallback.server_reports>`: the audit's canary updates) are
        already in it, validated and summed like any device's.
        """
        acc = UpdateAccumulator(
            num_params=self.params.numel(),
            round=plan.round,
            clip_norm=plan.config.clip_norm,
            weighting=self.strategy.weighting,
            ledger=self.population.server_ledger,
            num_devices=self.population.num_devices,
            keep_individual=self.strategy.needs_individual_updates,
            max_norm=self.scenario.engine.max_update_norm,
            device=self.device,
            max_examples=self.scenario.engine.max_examples,
            max_weight_share=self.scenario.engine.max_weight_share,
        )
        for cb in self.callbacks:
            _, own = cb.split_cohort(plan.round, plan.canaries)
            chunk = cb.server_reports(plan.round, own, plan.config.clip_norm)
            if chunk is not None:
                acc.add(chunk)
        return acc

    def end(self, plan: RoundPlan, acc: UpdateAccumulator, *, contributed: np.ndarray) -> tuple[dict[str, Any], UpdateBatch]:
        """Ledgers, aggregation, accounting, evaluation: the round's metrics row (not yet logged).

        ``contributed`` are the devices that trained (they remember it, as do the round's canary
        clients); the server's ledger records what ``acc`` accepted.
        """
        sc, round = self.scenario, plan.round
        self.population.device_memory.record(round, np.concatenate([np.asarray(contributed, dtype=np.int64), plan.canaries]))
        self.population.server_ledger.record(round, acc.accepted)
        batch = acc.result()
        self.rejected.update(batch.rejected)
        start = plan.params
        for cb in self.callbacks:
            cb.before_aggregate(round, start)
        self.params = self.strategy.aggregate(round=round, params=start, batch=batch).detach()
        for cb in self.callbacks:
            cb.after_aggregate(round, start, self.params, acc.accepted)
        report = None
        if plan.events:
            ledger, accountant = self.privacy()
            for event in plan.events:
                ledger.record(round, event)
            report = self.with_prior(accountant.report(ledger))
        row: dict[str, Any] = {"round": round + 1, **dict.fromkeys(workloads.task_of(self.data).metric_keys())}
        if (round + 1) % sc.engine.eval_every == 0 or round + 1 == sc.rounds:
            row.update(evaluate(self.model, self.params, self.data))
        row.update(
            train_loss=acc.mean_loss,
            clients=batch.num_updates,
            eligible=int(len(plan.eligible)),
            rejected=batch.num_rejected,
            **privacy_figures(report),
        )
        row.update(self.strategy.public_metrics(round=round, config=plan.config))
        equivalent = self.equivalent_report() if report is not None else None
        if equivalent is not None:  # the deployment's guarantee: a statement about it, not this run
            row.update(equivalent_rho=equivalent.rho, equivalent_epsilon=equivalent.epsilon)
        for cb in self.callbacks:
            cb.on_row(row, self.params)
        if self.private:
            # exact training loss and counts are not noisy releases: withheld from the public
            # run log (keys kept, null), kept in private/diagnostics.jsonl for the operator
            self.recorder.write_diagnostics({**row, "rejected_by_reason": dict(sorted(batch.rejected.items()))})
            row.update({key: None for key in WITHHELD_KEYS})
        return row, batch

    def commit(self, row: dict[str, Any]) -> None:
        """Log the round's row: release record, metrics, run directory, progress bar, checkpoint when due.

        The release record comes first (fsynced): a round re-executed on resume that does not
        reproduce what it released stops here (:class:`~fedsim.engine.releases.ReleaseError`),
        before anything of it is published again.
        """
        if self.releases is not None:
            round_no = int(row["round"])
            self.releases.release(round_no, release_digest(metrics_line(row), self.params), self.released_event(round_no))
        self.metrics.append(row)
        self.next_round = int(row["round"])
        self.recorder.append_row(row)
        if self.tracker is not None:  # the public row only: a DP run's withheld values are null here
            self.tracker.on_round(row)
        if self.checkpointer is not None and self.checkpointer.due(self.next_round):
            self.checkpointer.save(self.next_round, self.state_dict(), self.run_dir)
        if self.progress_bar is not None:
            # postfix first: update() redraws, showing this round's own figures
            self.progress_bar.set_postfix(progress_postfix(row), refresh=False)
            self.progress_bar.update(1)

    # -- a run ----------------------------------------------------------------------------------
    def start(self, *, progress: bool = False, desc: str | None = None) -> None:
        """Before the first round run here: write ``config.toml``, start the log, open the bar."""
        sc = self.scenario
        if self.prior is None:
            self.load_prior()
        self.recorder.start(sc.to_dict(), fresh=self.next_round == 0)
        if self.run_dir is not None and self.next_round == 0 and not self.resumed:
            # a new run: its key, then its release record
            self.save_key()
            path = self.releases_path
            if path is not None:
                self.create_releases(path)
        if progress:
            from tqdm.auto import tqdm

            self.progress_bar = tqdm(
                total=sc.rounds, initial=self.next_round, desc=desc or sc.name, unit="round", dynamic_ncols=True
            )

    def close_progress(self) -> None:
        """Close the progress bar, if any."""
        if self.progress_bar is not None:
            self.progress_bar.close()
            self.progress_bar = None

    def finish(self, wall: float) -> RunResult:
        """Final evaluation, summary, model, ledger and plot; the run's :class:`RunResult`."""
        self.close_progress()
        sc = self.scenario
        summary, private = run_summary(self, wall)
        # the backends' own parts (Flower: its counts, the participation ledger), then one write
        files: RunFiles = self.recorder.complete_summary(summary, private)
        equivalent = summary.get("equivalent")
        if equivalent is not None and self.equivalent_ledger is not None:
            # the deployment's events beside the run's own ledger.json (which stays the run's)
            files.public["ledger_equivalent.json"] = {**dict(equivalent), "events": self.equivalent_ledger.to_json()}
        if self.run_dir is not None:
            for cb in self.callbacks:
                cb.save(self.run_dir.path, self.params, self.next_round)
            self.recorder.finish(
                summary,
                private=private,
                files=files,
                ledger=self.ledger.to_json() if self.ledger is not None else None,
                model=self.save_model,
                plot_title=f"{sc.name} ({sc.strategy.name})",
            )
            if self.tracker is not None:
                self.tracker.on_finish(summary)
        return RunResult(
            self.run_dir.path if self.run_dir else None,
            self.params,
            self.metrics,
            summary,
            self.ledger,
            dict(self.rejected),
            list(self.diagnostics),
        )

    def save_model(self, path: Path) -> None:
        """Save the final model to ``path`` (``model.pt``: its state dict and how to rebuild it)."""
        sc = self.scenario
        set_flat(self.model, self.params)
        torch.save(
            {
                "state_dict": self.model.state_dict(),
                "model": sc.model.name,
                "hidden": sc.model.hidden,
                "model_params": dict(sc.model.params),
                "spec": dataclasses.asdict(self.data.spec),
                "num_features": self.data.num_features,
                "num_classes": self.data.num_classes,
                "flat": self.params.clone(),
            },
            path,
        )

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after :attr:`next_round` completed rounds.

        Keys: ``round``, ``scenario`` (resolved, minus neutral keys), ``params``, ``strategy``,
        ``trainer`` (or ``None``), ``population``, ``ledger`` (or ``None``), ``rejected``,
        ``rng`` (torch's global generator, for user plug-ins), ``audit`` (the canaries', or ``None``),
        ``noise`` (the name of the noise generator, :data:`fedsim.privacy.csprng.GENERATOR`),
        ``data`` (the data's fingerprint, :func:`~fedsim.data.fingerprint.data_fingerprint`).
        The checkpoint adds the run log's position.
        """
        trainer_state = self.trainer.state_dict()
        return {
            "round": self.next_round,
            "scenario": comparable(self.scenario.to_dict()),
            "params": self.params,
            "strategy": self.strategy.state_dict(),
            "trainer": trainer_state,
            "population": self.population.state_dict(),
            "ledger": self.ledger.to_json() if self.ledger is not None else None,
            "rejected": dict(self.rejected),
            "rng": {"torch": torch.get_rng_state()},
            # the audit callback's state is under "audit"; the key is kept without one (as before callbacks)
            "audit": None,
            "noise": GENERATOR,
            "data": self.data_fingerprint,
            **{cb.state_key: cb.state_dict() for cb in self.callbacks},
        }

    def check_state(self, state: dict[str, Any], *, source: str = "checkpoint", ahead: int = 0) -> None:
        """Refuse (:class:`~fedsim.engine.checkpoint.CheckpointError`, naming ``source``) a state
        written under a different scenario or on other data, whose parameters do not fit the
        model or, for a run whose releases depend on the noise key, by another noise generator;
        a DP run's state whose privacy ledger does not hold one event per completed round; and,
        with a release record, a ledger other than the record's events, or a state more than
        ``ahead`` rounds beyond the record (a Flower checkpoint is written just before its round
        is recorded: ``ahead=1``)."""
        written = state.get("noise", "an earlier generator")  # states before v2 did not name it
        if self.keyed and written != GENERATOR:
            raise CheckpointError(
                f"{source} was written with noise generator {written}, this fedsim draws noise with "
                f"{GENERATOR}: resumed rounds would add noise that does not match the rounds already "
                "released (a second noisy view of the same data); finish the run with the fedsim "
                "version that started it, or start a new run"
            )
        current = comparable(self.scenario.to_dict())
        diff = scenario_diff(state["scenario"], current, defaults=default_scenario_dict())
        if diff:
            raise CheckpointError(f"{source} was written under a different scenario; differing keys: {', '.join(diff)}")
        if state.get("data") is not None:
            changed = fingerprint_diff(state["data"], self.data_fingerprint)
            if changed:
                raise CheckpointError(
                    f"{source} was written on other data ({', '.join(changed)} differ); resuming on "
                    "changed data would release its rounds again with other inputs; restore the data, "
                    "or start a new run"
                )
        params = state["params"]
        if not isinstance(params, torch.Tensor) or params.shape != self.params.shape or params.dtype != self.params.dtype:
            raise CheckpointError(f"{source}: parameter vector does not fit the scenario's model")
        rounds_done = int(state["round"])
        ledger = state.get("ledger")
        if self.private:
            recorded = [entry.get("round") for entry in ledger or []] if isinstance(ledger, list) else None
            if recorded is not None:  # a round with several releases records one event of each kind
                recorded = [r for i, r in enumerate(recorded) if i == 0 or r != recorded[i - 1]]
            if recorded != list(range(rounds_done)):
                raise CheckpointError(
                    f"{source}: its privacy ledger holds {len(ledger or [])} events for {rounds_done} "
                    "completed rounds (a DP run records one event per released round); refusing it"
                )
        if self.releases is not None:
            if rounds_done > self.releases.released + ahead:
                raise ReleaseError(
                    f"{source} holds {rounds_done} rounds but {self.releases.path} records "
                    f"{self.releases.released} released: the record was cut back or replaced; "
                    "cannot tell what was published"
                )
            self.releases.check_ledger(ledger, min(rounds_done, self.releases.released), source=source)

    def restore(
        self, saved: dict[str, Any], path: Path, *, ahead: int = 0, pending_row: dict[str, Any] | None = None
    ) -> int:
        """Continue from a checkpoint's ``saved`` state (read from ``path``): the one resume path
        of the in-process engine (:meth:`fedsim.engine.simulation.Simulation.resume`) and a
        restarted Flower job (:meth:`fedsim.flower.strategy.FedsimStrategy.resume`).

        The state is checked (:meth:`check_state`, ``ahead`` as there) before anything changes;
        then the run log is cut back to the checkpoint's position, the state restored and, with a
        ``pending_row`` (a Flower checkpoint is written before its round's row is published),
        that round recorded as released (unless it was) and its row appended. The private
        diagnostics of later rounds are dropped. Returns the completed rounds restored.
        """
        self.check_state(saved, source=str(path), ahead=ahead)
        if self.run_dir is not None:
            restore_metrics_log(self.run_dir, saved["metrics"], path)
        state = {k: v for k, v in saved.items() if k not in CHECKPOINT_EXTRAS}
        self.load_state_dict(state, source=str(path), ahead=ahead)
        if pending_row is not None:
            if self.releases is not None:
                self.releases.release(
                    self.next_round,
                    release_digest(metrics_line(pending_row), self.params),
                    self.released_event(self.next_round),
                )
            self.recorder.append_row(pending_row)
            self.metrics.append(pending_row)
        self.recorder.cut_diagnostics(self.next_round)
        self.resumed = True
        return self.next_round

    def load_state_dict(self, state: dict[str, Any], *, source: str = "checkpoint", ahead: int = 0) -> None:
        """Restore :meth:`state_dict` into a freshly built owner of the same scenario (checked
        with :meth:`check_state` first, ``ahead`` as there)."""
        self.check_state(state, source=source, ahead=ahead)
        params = state["params"]
        self.params = params.clone()
        self.strategy.load_state_dict(state["strategy"])
        if state.get("trainer") is not None:
            self.trainer.load_state_dict(state["trainer"])
        self.population.load_state_dict(state["population"])
        if state["ledger"] is not None:
            from fedsim.privacy.events import PrivacyLedger

            self.privacy()
            self.ledger = PrivacyLedger.from_json(state["ledger"])
        self.equivalent_ledger = None  # rebuilt from the deployment's planned events when asked
        self.rejected.clear()
        self.rejected.update({str(k): int(v) for k, v in state["rejected"].items()})
        torch.set_rng_state(state["rng"]["torch"])
        for cb in self.callbacks:
            cb.load_state_dict(state.get(cb.state_key))
        self.next_round = int(state["round"])
        self.metrics = self.recorder.read_rows()
