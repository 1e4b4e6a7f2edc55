"""The in-process round loop.

One round (see docs/architecture.md):

1. ask the strategy for the round's privacy event; stop *before* the round if recording it would
   exceed the scenario's ``max-rho`` / ``max-epsilon``;
2. devices check in (availability model + their own participation memory);
3. the strategy selects the cohort and configures the clients (clip bound, learning rate);
4. the trainer trains the cohort in chunks; every delta is validated by the server
   (:class:`~fedsim.engine.aggregation.UpdateAccumulator`) and reduced into a running sum;
5. the strategy aggregates (adding noise for DP strategies); the event is recorded in the ledger;
6. the global model is evaluated on the held-out test split; metrics and privacy figures are
   written to the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim import seeds, workloads
from fedsim.atomic import atomic_write_text
from fedsim.client import TRAINERS, ClientTrainer
from fedsim.data.federated import FederatedData
from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.engine.allocator import keep_freed_memory
from fedsim.engine.canaries import CanaryClients
from fedsim.engine.checkpoint import (
    CHECKPOINT_DIR,
    Checkpointer,
    CheckpointError,
    resume_from_checkpoint,
)
from fedsim.engine.rundir import RunDir
from fedsim.errors import ScenarioError
from fedsim.models import get_flat, num_params, set_flat
from fedsim.population import (
    AlwaysAvailable,
    Availability,
    BernoulliAvailability,
    DiurnalAvailability,
    Population,
)
from fedsim.privacy.noise import KEY_FILE, TAG_SELECT, NoiseKey, NoiseKeyError, NoiseSource
from fedsim.scenario import Scenario
from fedsim.strategy import STRATEGIES, Strategy, StrategyContext
from fedsim.types import ClientTask, TrainConfig, UpdateBatch

#: Where a DP run keeps exact values it does not publish (mode 0700).
PRIVATE_DIR = "private"
#: ``metrics.jsonl`` keys a DP run publishes as ``null`` (exact values: ``private/diagnostics.jsonl``).
WITHHELD_KEYS = ("train_loss", "clients", "eligible", "rejected")


def _load_key(path: Path, where: str) -> NoiseKey:
    try:
        return NoiseKey.load(path)
    except NoiseKeyError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def build_data(scenario: Scenario) -> FederatedData:
    """The scenario's federated dataset (:func:`fedsim.workloads.build_data`)."""
    return workloads.build_data(scenario)


def build_availability(scenario: Scenario, *, extra_devices: int = 0, num_devices: int | None = None) -> Availability:
    """The scenario's availability model (for its ``num_devices`` devices, default the scenario's,
    plus ``extra_devices`` canaries)."""
    cfg = scenario.population
    if num_devices is None:
        num_devices = scenario.data.num_devices
    if cfg.availability == "bernoulli":
        return BernoulliAvailability(cfg.check_in_prob)
    if cfg.availability == "diurnal":
        return DiurnalAvailability(
            cfg.check_in_prob,
            cfg.amplitude,
            cfg.period,
            num_devices=num_devices + extra_devices,
            seed=scenario.seed,
        )
    return AlwaysAvailable()


def build_canaries(scenario: Scenario, data: FederatedData, num_params: int, source: Any) -> CanaryClients | None:
    """The run's canary clients (``[audit] canaries``), or ``None``."""
    cfg = scenario.audit
    if cfg.canaries == 0:
        return None
    from fedsim.scenario import check_canaries_fit_population

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


def build_strategy(scenario: Scenario) -> Strategy:
    cls = STRATEGIES.get(scenario.strategy.name, base_dir=scenario.base_dir)
    return cls(**scenario.strategy.params)


def build_scenario_model(scenario: Scenario, data: FederatedData, *, seed: int = 0) -> torch.nn.Module:
    """The scenario's model sized for ``data`` (parameters initialised from ``seed``)."""
    return workloads.build_scenario_model(scenario, data, seed=seed)


def build_trainer(scenario: Scenario, model: torch.nn.Module, data: FederatedData | None = None) -> ClientTrainer:
    """The scenario's client trainer for ``model``, training on ``data``'s task."""
    cls = TRAINERS.get(scenario.client.trainer, base_dir=scenario.base_dir)
    trainer = cls(model, **scenario.client.params)
    if data is not None:
        trainer.objective = workloads.task_of(data)
    return trainer


def evaluate(model: torch.nn.Module, params: torch.Tensor, data: FederatedData) -> dict[str, float]:
    """Test metrics of ``params`` on ``data``'s test split (``accuracy``, ``loss``, task extras)."""
    set_flat(model, params)
    return workloads.task_of(data).evaluate(model, data.test_x, data.test_y)


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


class Simulation:
    """Runs a :class:`Scenario` in this process.

    Parameters
    ----------
    scenario:
        The validated scenario.
    run_dir:
        Where to write the run directory; ``None`` writes nothing (tests, benchmarks).
    progress:
        Show a progress bar with per-round metrics.
    noise_key:
        The run's secret noise key. Default: the scenario's ``[privacy] noise-key-file`` if it
        names one, else a fresh key from :mod:`secrets` (kept as ``secret/noise.key`` in the run
        directory of a DP run, mode 0600; :meth:`resume` reads it back).

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
        progress: bool = True,
        noise_key: NoiseKey | None = None,
    ) -> None:
        self.scenario = scenario
        self.progress = progress
        self.run_dir = RunDir(run_dir) if run_dir is not None else None
        torch.set_num_threads(scenario.engine.threads)
        keep_freed_memory()  # reuse freed heap memory: see fedsim.engine.allocator
        self.data = build_data(scenario)
        self.model = build_scenario_model(
            scenario, self.data, seed=seeds.derived_seed(scenario.seed, seeds.STREAM_MODEL_INIT)
        )
        self.params = get_flat(self.model)
        self.strategy = build_strategy(scenario)
        self.base_config = TrainConfig(
            round=0,
            lr=scenario.client.lr,
            local_epochs=scenario.client.local_epochs,
            batch_size=scenario.client.batch_size,
        )
        # the trainer gets its own copy of the model so evaluation never disturbs it
        self.trainer = build_trainer(scenario, build_scenario_model(scenario, self.data), self.data)
        fixed = scenario.noise_key_path
        if noise_key is not None:
            self.key_origin = "given"
        elif fixed is not None:
            noise_key = _load_key(fixed, "[privacy] noise-key-file")
            self.key_origin = "fixed"
        else:
            noise_key = NoiseKey.generate()
            self.key_origin = "secret"
        self._set_key(noise_key)
        #: a DP run: its strategy records privacy events (decides what is published)
        self.private = self.strategy.privacy_event(round=0) is not None
        # [audit]: canary clients are extra devices (ids after the real ones), see fedsim.engine.canaries
        self.canaries = build_canaries(scenario, self.data, self.params.numel(), self._noise_source())
        extra = self.canaries.count if self.canaries is not None else 0
        self.population = Population(
            self.data,
            build_availability(scenario, extra_devices=extra, num_devices=self.data.num_devices),
            self.strategy.participation_limit(),
            extra_devices=extra,
        )
        # backend = "ray": the same round loop, cohort training sharded over Ray actors
        self.ray: Any | None = None
        if scenario.engine.backend == "ray":
            from fedsim.engine.ray_backend import RayCohortRunner

            self.ray = RayCohortRunner(scenario)
        self.ledger: Any | None = None
        self.accountant: Any | None = None
        self.rejected: Counter[str] = Counter()
        self.metrics: list[dict[str, Any]] = []
        self.diagnostics: list[dict[str, Any]] = []
        self.next_round = 0
        self.stopped_reason = "completed"
        self.checkpointer: Checkpointer | None = None
        if self.run_dir is not None and scenario.checkpoint.every > 0:
            self.checkpointer = Checkpointer(
                self.run_dir.path / CHECKPOINT_DIR, scenario.checkpoint.every, scenario.checkpoint.keep
            )

    def _noise_source(self) -> Any:
        """The run's secret noise source (canary directions are drawn from it, tag TAG_AUDIT)."""
        return self.noise_source

    def _set_key(self, key: NoiseKey) -> None:
        """Key the run: the strategy's noise source (set up afresh) and the trainer's private randomness."""
        self.noise_source = NoiseSource(key)
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
        set_private = getattr(self.trainer, "set_private_source", None)
        if callable(set_private):
            set_private(self.noise_source)

    @property
    def key_path(self) -> Path | None:
        """Where this run keeps its secret key (``None`` without a run directory)."""
        return self.run_dir.path / KEY_FILE if self.run_dir is not None else None

    def _save_key(self) -> None:
        """Write the secret key of a fresh DP run to ``secret/noise.key`` (0600, directory 0700)."""
        # an audited run keeps its key too: its canary directions are drawn from it
        keyed = self.private or getattr(self, "canaries", None) is not None
        if not (keyed and self.key_origin == "secret" and self.run_dir is not None):
            return
        path = self.run_dir.path / KEY_FILE
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.parent.chmod(0o700)
        self.noise_source.key.save(path)

    def selection_rng(self, round: int) -> np.random.Generator:
        """The cohort-selection generator: from the secret key in a DP run, the public seed otherwise."""
        if self.private:
            return self.noise_source.generator((TAG_SELECT, round))
        return seeds.round_rng(self.scenario.seed, seeds.STREAM_SELECTION, round)

    def resume(self) -> int:
        """Continue from the newest usable checkpoint in the run directory.

        A DP run first reads its secret key back from ``secret/noise.key`` (or the scenario's
        fixed key file), so replayed rounds add the very noise they added before; without it the
        run refuses to resume (:class:`~fedsim.engine.checkpoint.CheckpointError`).
        Returns the number of completed rounds restored (see :mod:`fedsim.engine.checkpoint`).
        """
        keyed = self.private or self.canaries is not None
        if keyed and self.key_origin == "secret" and self.run_dir is not None:
            path = self.run_dir.path / KEY_FILE
            if not path.exists():
                raise CheckpointError(
                    f"{path}: the run's secret noise key is missing, cannot resume: replayed rounds "
                    "would add fresh noise and release a second noisy view of the same data "
                    "(restore the key file, or start a new run in another directory)"
                )
            self._set_key(_load_key(path, "--resume"))
            if self.canaries is not None:  # canary directions come from the key too
                self.canaries = build_canaries(self.scenario, self.data, self.params.numel(), self._noise_source())
        done = resume_from_checkpoint(self)
        self._cut_diagnostics(done)
        return done

    # -- private diagnostics (DP runs) ------------------------------------------------------
    @property
    def diagnostics_path(self) -> Path | None:
        """``private/diagnostics.jsonl``: exact per-round values a DP run does not publish."""
        return self.run_dir.path / PRIVATE_DIR / "diagnostics.jsonl" if self.run_dir is not None else None

    def _write_diagnostics(self, row: dict[str, Any]) -> None:
        self.diagnostics.append(row)
        path = self.diagnostics_path
        if path is None:
            return
        path.parent.mkdir(mode=0o700, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def _cut_diagnostics(self, rounds_done: int) -> None:
        """Drop the diagnostics of rounds that a resume replays."""
        path = self.diagnostics_path
        if path is None or not path.exists():
            return
        keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["round"] <= rounds_done]
        atomic_write_text(path, "".join(line + "\n" for line in keep))
        self.diagnostics = [json.loads(line) for line in keep]

    # ---------------------------------------------------------------------------------------
    def _privacy(self) -> tuple[Any, Any]:
        """Ledger and accountant, created on the first privacy event (non-DP runs need neither)."""
        if self.ledger is None:
            from fedsim.privacy.accountant import Accountant
            from fedsim.privacy.events import PrivacyLedger

            self.ledger = PrivacyLedger()
            self.accountant = Accountant(delta=self.scenario.privacy.delta)
        return self.ledger, self.accountant

    def _budget_exceeded(self, round: int, event: Any) -> str | None:
        cfg = self.scenario.privacy
        if event is None or (cfg.max_rho is None and cfg.max_epsilon is None):
            return None
        ledger, accountant = self._privacy()
        report = accountant.report_with(ledger, round, event)
        if cfg.max_rho is not None and report.rho is not None and report.rho > cfg.max_rho:
            return f"privacy budget: round {round + 1} would reach rho={report.rho:.4g} > max-rho={cfg.max_rho:g}"
        if cfg.max_epsilon is not None and report.epsilon is not None and report.epsilon > cfg.max_epsilon:
            return (
                f"privacy budget: round {round + 1} would reach epsilon={report.epsilon:.4g} "
                f"> max-epsilon={cfg.max_epsilon:g}"
            )
        return None

    def _tasks(self, round: int, cohort: np.ndarray) -> Iterator[ClientTask]:
        for dev in cohort:
            x, y = self.data.client_data(int(dev))
            yield ClientTask(int(dev), x, y, seeds.client_seed(self.scenario.seed, round, int(dev)))

    def run_round(self, round: int) -> dict[str, Any] | None:
        """Execute one round; return its metrics row, or ``None`` if the budget stops the run."""
        sc = self.scenario
        event = self.strategy.privacy_event(round=round)
        reason = self._budget_exceeded(round, event)
        if reason is not None:
            self.stopped_reason = reason
            return None
        eligible = self.population.check_in(round, seeds.round_rng(sc.seed, seeds.STREAM_AVAILABILITY, round))
        cohort = self.strategy.select(round=round, eligible=eligible, rng=self.selection_rng(round))
        config = self.strategy.configure_client(round=round, base=_with_round(self.base_config, round))
        acc = UpdateAccumulator(
            num_params=self.params.numel(),
            round=round,
            clip_norm=config.clip_norm,
            weighting=self.strategy.weighting,
            ledger=self.population.server_ledger,
            num_devices=self.population.num_devices,
            keep_individual=self.strategy.needs_individual_updates,
            max_norm=sc.engine.max_update_norm,
            max_examples=sc.engine.max_examples,
        )
        real = cohort
        if self.canaries is not None:
            real, canary_ids = self.canaries.split(cohort)
            if len(canary_ids):  # canary updates: validated and summed like any device's
                acc.add(self.canaries.chunk(round, canary_ids, config.clip_norm))
        if self.ray is not None:
            chunks = self.ray.train_cohort(self.params, round, real, config, chunk_size=sc.engine.chunk_size)
        else:
            chunks = self.trainer.train_cohort(self.params, self._tasks(round, real), config, chunk_size=sc.engine.chunk_size)
        for chunk in chunks:
            acc.add(chunk)
        row, _ = self.finish_round(round, event=event, eligible=eligible, contributed=cohort, acc=acc)
        return row

    def finish_round(
        self,
        round: int,
        *,
        event: Any,
        eligible: np.ndarray,
        contributed: np.ndarray,
        acc: UpdateAccumulator,
        params: torch.Tensor | None = None,
    ) -> tuple[dict[str, Any], UpdateBatch]:
        """The part of a round after every update is in: ledgers, aggregation, accounting, metrics.

        Shared by the in-process loop and the Flower bridge, so both record and report a round
        identically. ``contributed`` are the devices that trained (they remember it); the server's
        ledger records what ``acc`` accepted. ``params`` defaults to the current global model.
        """
        sc = self.scenario
        self.population.device_memory.record(round, contributed)
        self.population.server_ledger.record(round, acc.accepted)
        batch = acc.result()
        self.rejected.update(batch.rejected)
        start = self.params if params is None else params
        if self.canaries is not None:
            self.canaries.start(start)
        self.params = self.strategy.aggregate(round=round, params=start, batch=batch).detach()
        if self.canaries is not None:
            self.canaries.record_round(start, self.params, acc.accepted)
        report = None
        if event is not None:
            ledger, accountant = self._privacy()
            ledger.record(round, event)
            report = accountant.report(ledger)
        row: dict[str, Any] = {"round": round + 1, **dict.fromkeys(workloads.task_of(self.data).metric_keys())}
        if (round + 1) % sc.engine.eval_every == 0 or round + 1 == sc.rounds:
            row.update(evaluate(self.model, self.params, self.data))
        row.update(
            train_loss=acc.mean_loss,
            clients=batch.num_updates,
            eligible=int(len(eligible)),
            rejected=batch.num_rejected,
            rho=getattr(report, "rho", None),
            epsilon=getattr(report, "epsilon", None),
            epsilon_rdp=getattr(report, "epsilon_rdp", None),
            delta=getattr(report, "delta", None),
        )
        if self.canaries is not None:
            row["audit_epsilon"] = self.canaries.quick_epsilon(self.params)
        if self.private:
            # exact training loss and counts are not noisy releases: withheld from the public
            # run log (keys kept, null), kept in private/diagnostics.jsonl for the operator
            self._write_diagnostics({**row, "rejected_by_reason": dict(sorted(batch.rejected.items()))})
            row.update({key: None for key in WITHHELD_KEYS})
        return row, batch

    def run(self) -> RunResult:
        """Run all remaining rounds, writing the run directory as it goes."""
        sc = self.scenario
        start = time.perf_counter()
        if self.run_dir is not None:
            self.run_dir.write_config(sc.to_dict())
            if self.next_round == 0:
                self.run_dir.reset_metrics()
                diagnostics = self.diagnostics_path
                if diagnostics is not None and diagnostics.exists():
                    diagnostics.unlink()
                self._save_key()
        bar = None
        describe = getattr(self.trainer, "describe", None)
        if self.progress and describe is not None and self.ray is None:
            path = describe()
            print(f"{sc.name}: trainer path {path['path']}: {path['reason']}", file=sys.stderr, flush=True)
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sc.rounds, initial=self.next_round, desc=sc.name, unit="round", dynamic_ncols=True)
        try:
            for r in range(self.next_round, sc.rounds):
                row = self.run_round(r)
                if row is None:
                    break
                self.metrics.append(row)
                self.next_round = r + 1
                if self.run_dir is not None:
                    self.run_dir.append_metrics(row)
                if self.checkpointer is not None and self.checkpointer.due(self.next_round):
                    self.checkpointer.save(self)
                if bar is not None:  # postfix first: update() redraws, showing this round's own figures
                    bar.set_postfix(progress_postfix(row), refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            if self.ray is not None:
                self.ray.close()
        wall = time.perf_counter() - start
        return self._finish(wall)

    def _finish(self, wall: float) -> RunResult:
        sc = self.scenario
        last_eval = next((m for m in reversed(self.metrics) if m["accuracy"] is not None), None)
        if last_eval is None or last_eval["round"] != self.next_round:
            final = evaluate(self.model, self.params, self.data)
        else:
            final = {k: v for k, v in last_eval.items() if k in ("accuracy", "loss", "perplexity")}
        acc, loss = final["accuracy"], final["loss"]
        report = self.accountant.report(self.ledger) if self.ledger is not None else None
        summary: dict[str, Any] = {
            "name": sc.name,
            "strategy": sc.strategy.name,
            "accuracy": acc,
            "loss": loss,
            **({"perplexity": final["perplexity"]} if "perplexity" in final else {}),
            "rounds": self.next_round,
            "rounds_planned": sc.rounds,
            "stopped_reason": self.stopped_reason,
            "wall_time_s": round(wall, 3),
            "rho": getattr(report, "rho", None),
            "epsilon": getattr(report, "epsilon", None),
            "epsilon_rdp": getattr(report, "epsilon_rdp", None),
            "delta": getattr(report, "delta", None),
            # per-reason counts are exact, data-dependent values: private in a DP run
            "rejected": None if self.private else dict(sorted(self.rejected.items())),
            "num_devices": self.data.num_devices,
            "clients_per_round": sc.clients_per_round,
            "seed": sc.seed,
        }
        describe = getattr(self.trainer, "describe", None)
        if describe is not None:
            summary["trainer"] = describe()
        if self.private:
            summary["noise_key"] = (
                {"kind": "fixed", "file": str(self.scenario.noise_key_path)}
                if self.key_origin == "fixed"
                else {"kind": self.key_origin, "file": str(KEY_FILE) if self.key_origin == "secret" else None}
            )
        example = self.trainer.example_privacy(delta=sc.privacy.delta)
        if example is not None:
            summary["example_level"] = example
        if self.canaries is not None and self.next_round > 0:
            summary["audit"] = self.canaries.report(
                self.params, formal={"rho": summary["rho"], "epsilon": summary["epsilon"]}
            )
        if self.run_dir is not None:
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
                self.run_dir.path / "model.pt",
            )
            if self.ledger is not None:
                self.run_dir.write_json("ledger.json", self.ledger.to_json())
            if self.canaries is not None and self.next_round > 0:
                self.canaries.save(self.run_dir.path, self.params)
            if self.private:
                (self.run_dir.path / PRIVATE_DIR).mkdir(mode=0o700, exist_ok=True)
                self.run_dir.write_json(
                    f"{PRIVATE_DIR}/summary.json", {"rejected": dict(sorted(self.rejected.items()))}
                )
            self.run_dir.write_json("summary.json", summary)
            self.run_dir.plot(self.run_dir.read_metrics(), f"{sc.name} ({sc.strategy.name})", summary.get("audit"))
        return RunResult(
            self.run_dir.path if self.run_dir else None,
            self.params,
            self.metrics,
            summary,
            self.ledger,
            dict(self.rejected),
            list(self.diagnostics),
        )


def _with_round(config: TrainConfig, round: int) -> TrainConfig:
    from dataclasses import replace

    return replace(config, round=round)


def progress_postfix(row: dict[str, Any]) -> dict[str, str]:
    """The progress bar's figures for one metrics row (in-process and Flower runs alike)."""
    out = {}
    for key, short in (("accuracy", "acc"), ("loss", "loss"), ("rho", "rho"), ("epsilon", "eps"), ("audit_epsilon", "emp_eps")):
        if row.get(key) is not None:
            out[short] = f"{row[key]:.4g}"
    if row.get("clients") is not None:
        out["clients"] = str(row["clients"])
    return out


def run_scenario(
    scenario: Scenario, *, run_dir: str | Path | None = None, progress: bool = False, noise_key: NoiseKey | None = None
) -> RunResult:
    """Convenience: build a :class:`Simulation` and run it."""
    return Simulation(scenario, run_dir=run_dir, progress=progress, noise_key=noise_key).run()
