"""The bridge: any fedsim :class:`~fedsim.strategy.Strategy` as a Flower Message-API strategy.

:class:`FedsimStrategy` implements Flower's ``flwr.serverapp.strategy.Strategy``
(``configure_train``, ``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``,
``summary``; Flower's own concrete ``start`` drives the rounds) around the fedsim strategy that a
scenario names. Its rounds are begun and ended by the engine's round owner
(:class:`~fedsim.engine.rounds.RoundOwner`: data, model, strategy, population and ledgers,
privacy ledger, run directory), exactly as in the in-process simulator; the client work runs on
the grid through :class:`~fedsim.flower.executor.FlowerGridExecutor`, the Flower implementation of the engine's
:class:`~fedsim.engine.executors.CohortExecutor` contract:

1. the strategy's privacy event for the round; the run stops before a round that would exceed the
   scenario's ``max-rho`` / ``max-epsilon``;
2. **check-in**: every Flower node the SuperLink lists is asked once (a ``query`` message) for its
   device id, its ``partition-id``; nodes that answer form the roster ``node -> device``. The
   first round waits for ``min_nodes`` check-ins; later rounds admit new nodes (a restarted
   SuperNode gets a new node id) as their answers arrive, without waiting. A node that misses a
   reply deadline or answers with an error leaves the roster and is asked to check in again (in a
   DP run that check-in is withheld like the failure it follows, and the public record keeps the
   node on the roster until it leaves the grid);
3. eligible devices: the scenario's availability model (same seeded draw as the simulator) among
   devices on the roster whose participation memory allows the round; the strategy selects the
   cohort with the simulator's per-round selection generator and configures the clients;
4. one ``train`` message per selected device, carrying the global model and a
   :class:`~fedsim.flower.protocol.TrainInstruction` (round config, per-(seed, round, device) task
   seed, participation limit, job id, scenario sections);
5. every reply is validated on the server: decoded against the model's layout (keys, shapes,
   ``float32``), then :class:`~fedsim.engine.aggregation.UpdateAccumulator` checks finiteness, the
   clip bound, duplicates and the server's participation ledger, and reduces the accepted deltas
   in the simulator's order and chunking. Rejections are counted by reason and logged;
6. the strategy aggregates, the privacy event is recorded once, rho and epsilon are reported, the
   model is evaluated on the server's held-out split, and the round's metrics row is written.

With the same scenario, seed and partitions, and every device connected, a Flower run therefore
selects the same cohorts, trains the same clients with the same seeds and reduces them in the same
order as the simulator: final parameters and ``metrics.jsonl`` agree.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.engine.checkpoint import CheckpointError, CheckpointKey
from fedsim.engine.keystore import load_key
from fedsim.engine.recorder import RunFiles
from fedsim.engine.releases import ReleaseError, ReleaseRecord, prior_report
from fedsim.engine.rounds import RoundOwner, RoundPlan, RunResult, read_prior_run
from fedsim.errors import ScenarioError
from fedsim.flower.executor import (
    PRIVATE_FLOWER_COUNTS,
    ROSTER_COUNTS,
    WITHHELD,
    FlowerGridExecutor,
    SentRound,
)
from fedsim.flower.identity import DeviceKeys
from fedsim.flower.protocol import client_scenario_sections
from fedsim.flower.records import ParamLayout
from fedsim.flower.server_state import ServerState
from fedsim.flower.traffic import Traffic
from fedsim.privacy.events import SampledGaussianEvent
from fedsim.scenario import Scenario

# the executor lives in fedsim.flower.executor; its names stay importable from here
__all__ = ["PRIVATE_FLOWER_COUNTS", "ROSTER_COUNTS", "WITHHELD", "FedsimStrategy", "FlowerGridExecutor", "SentRound"]

logger = logging.getLogger("flwr.fedsim")


class FedsimStrategy(FlowerStrategy):
    """Run a fedsim scenario's strategy on a Flower server.

    In a ServerApp, ``FedsimStrategy(scenario, run_dir=...).run(grid)`` runs every round and
    writes the run directory; Flower's own ``start(grid, initial_arrays(), num_rounds, timeout)``
    runs the rounds alone (metrics rows are still appended when a run directory is given).
    Replies rejected before the accumulator sees them count as ``malformed_record``,
    ``wrong_shape``, ``wrong_dtype``, ``device_mismatch`` or ``bad_example_count``, next to the
    accumulator's own reasons.

    Parameters
    ----------
    scenario:
        The validated scenario: its strategy (registered name or import path), data, model,
        client settings, population availability and privacy budget.
    run_dir:
        Run directory to write (same layout as ``fedsim run``, plus ``participation.json``), or
        ``None``.
    job_id:
        The job devices keep their participation ledgers under; runs that share a job id share
        the devices' limits (e.g. a server restarted for the same training job).
    min_nodes:
        The first round waits until at least this many nodes have checked in (later nodes join
        the round after they answer).
    checkin_timeout:
        Seconds the first round waits for ``min_nodes`` check-ins; fewer is an error.
    progress:
        Show a progress bar (the simulation backend); deployed servers log one line per round.
    state:
        The job's durable server state (:class:`~fedsim.flower.server_state.ServerState`): the
        job's noise key comes from it (drawn and saved when the job is new), a checkpoint is
        written after every round, and :meth:`run` continues a job that has one instead of
        starting over. ``None``: a fresh key, nothing kept (one-shot runs, Flower's simulation).
    device_keys:
        The device key roster (:func:`~fedsim.flower.identity.load_device_keys`): a node is admitted
        as device ``d`` only if its authenticated SuperNode key is the one issued for ``d``.
        ``None``: device ids are self-claimed (the first claim of an id stands).
    prior_jobs:
        Earlier jobs in the same state directory whose released rounds count toward this job's
        privacy (one abandoned because its state could not be restored): their rho, from their
        release records, is added to this job's report and budget (``summary.json["prior"]``).
    """

    def __init__(
        self,
        scenario: Scenario,
        *,
        run_dir: str | Path | None = None,
        job_id: str = "fedsim",
        min_nodes: int = 1,
        checkin_timeout: float = 120.0,
        progress: bool = False,
        state: ServerState | None = None,
        device_keys: DeviceKeys | None = None,
        prior_jobs: Sequence[str] = (),
    ) -> None:
        if min_nodes < 1:
            raise ValueError(f"min_nodes must be >= 1, got {min_nodes}")
        if not checkin_timeout > 0:
            raise ValueError(f"checkin_timeout must be > 0, got {checkin_timeout}")
        # Flower executes the rounds: the recorded scenario says so
        scenario = replace(scenario, engine=replace(scenario.engine, backend="flower"))
        self.scenario = scenario
        self.state = state
        key = None
        if state is not None and scenario.noise_key_path is None:
            key, fresh = state.key()
            logger.info("fedsim: job %r: %s", job_id, "new job, fresh secret noise key" if fresh else "job state found, its key is reused")
        if state is not None and not scenario.privacy.run_id:
            # the job's run id: a restarted server draws the job's noise again, another job never
            scenario = replace(scenario, privacy=replace(scenario.privacy, run_id=state.run_id()))
            self.scenario = scenario
        # every sampled device gets its own train message: devices, the SuperLink and the network
        # learn the cohort, so a Poisson-sampled round claims no amplification here; the job's
        # release record lives in its state directory (self.resume), not the run directory
        self.owner = RoundOwner(
            scenario, run_dir=run_dir, checkpoints=False, noise_key=key, secret_cohort=False, record_releases=False
        )
        sampled = self.owner.strategy.privacy_event(round=0)
        if isinstance(sampled, SampledGaussianEvent):
            logger.warning(
                "fedsim: %s samples devices (Poisson, q = %.4g), but on Flower every sampled device receives its own "
                "train message, so devices and network observers learn the cohort: epsilon is reported without "
                "amplification by sampling (docs/threat-model.md)",
                scenario.strategy.name, sampled.sampling_rate,
            )
        #: the job's checkpoint key: its checkpoints are authenticated under its noise key
        self.auth = CheckpointKey.of(self.owner.noise_source.key) if state is not None else None
        self.prior_jobs = [job for job in prior_jobs if job]
        if self.prior_jobs and state is None:
            raise CheckpointError("prior-jobs needs the server's state directory (the jobs' release records)")
        #: rounds completed before this server started (a resumed job)
        self.offset = 0
        self.strategy = self.owner.strategy
        self.limit = self.strategy.participation_limit()
        self.job_id = job_id
        self.progress = progress
        #: what the server exchanges with the devices (``summary.json["flower"]["traffic"]``)
        self.traffic = Traffic()
        #: ``[flower] secure-aggregation``: rounds run under Flower's SecAgg+ (fedsim.flower.secagg)
        self.secure = scenario.flower.secure_aggregation
        executor_kwargs: dict[str, Any] = {}
        executor_cls: type[FlowerGridExecutor] = FlowerGridExecutor
        if self.secure:
            from fedsim.flower.secagg import SecAggGridExecutor, check_quantisation

            if self.owner.strategy.weighting != "uniform":
                raise ScenarioError(
                    f"secure aggregation sums the updates with weight 1 each, but strategy {scenario.strategy.name!r} "
                    f"weights them by {self.owner.strategy.weighting}; use a DP strategy (dp-fedavg, dp-ftrl) or set it false",
                    key="flower.secure-aggregation",
                )
            if getattr(self.owner.strategy, "adaptive", None) is not None:
                # the clients' clipped bits would travel in the clear beside the masked vectors
                raise ScenarioError(
                    "secure aggregation sums the updates only, but adaptive clipping (strategy.target-quantile) needs "
                    "each client's clipped bit, which would reach the server in the clear; use a fixed clip-norm",
                    key="flower.secure-aggregation",
                )
            clip = getattr(self.owner.strategy, "clip_norm", None)
            check_quantisation(
                scenario.flower, float(clip) if isinstance(clip, int | float) else None, ParamLayout.of(self.owner.model).num_params
            )
            executor_cls = SecAggGridExecutor
            executor_kwargs = {"settings": scenario.flower, "traffic": self.traffic}
        self.executor = executor_cls(
            **executor_kwargs,
            layout=ParamLayout.of(self.owner.model),
            num_devices=self.owner.data.num_devices,
            chunk_size=scenario.engine.chunk_size,
            run_seed=scenario.seed,
            limit=self.limit,
            job_id=job_id,
            sections=client_scenario_sections(scenario),
            min_nodes=min_nodes,
            checkin_timeout=checkin_timeout,
            device_keys=device_keys,
        )
        self.layout = self.executor.layout
        self.executor.private = self.owner.private
        self.sent: SentRound | None = None
        self.first_checkin_done = False

    @property
    def roster(self) -> dict[int, int]:
        """node id -> device id of the nodes that checked in."""
        return self.executor.roster

    @property
    def events(self) -> Counter[str]:
        """Flower-level counts: no_reply, client_error, declined, unexpected_reply, checkins, ...

        Exact (a DP run publishes them as :meth:`run` says); see :attr:`FlowerGridExecutor.events`.
        """
        return self.executor.events

    # ------------------------------------------------------------------------------------------
    # Flower Strategy interface

    def summary(self) -> None:
        """Log what is wrapped and how it is enforced."""
        s, sc = self.strategy, self.scenario
        limit = self.limit
        logger.info(
            "fedsim strategy %r (%s, weighting=%s) on %d devices, %d per round, %d rounds",
            sc.strategy.name, type(s).__name__, s.weighting, self.owner.data.num_devices, sc.clients_per_round, sc.rounds,
        )
        if limit is not None:
            logger.info(
                "participation limit: max %s contributions, %d rounds between (server ledger + device ledgers, job %r)",
                limit.max_participations, limit.min_separation, self.job_id,
            )
        if self.secure:
            fl = sc.flower
            logger.info(
                "secure aggregation: Flower's SecAgg+ (shares %s, threshold %s, quantization range %d, modulus %d): "
                "the server learns only each round's sum; devices clip",
                fl.secagg_shares or "cohort", fl.secagg_threshold or "majority", fl.secagg_quantization_range, fl.secagg_modulus,
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check nodes in, plan the round with the round owner, build its messages."""
        self.sent = None
        owner = self.owner
        if owner.stopped_reason != "completed":
            return []

        def reachable() -> np.ndarray:
            self.executor.refresh_roster(grid, wait=not self.first_checkin_done)
            self.first_checkin_done = True
            return self.executor.connected()

        plan = owner.begin(self.offset + server_round - 1, params=self.layout.to_flat(arrays), reachable=reachable)
        if plan is None:
            logger.warning("fedsim: stopping before round %d: %s", server_round, owner.stopped_reason)
            return []
        self.executor.grid = grid
        self.sent = self.executor.messages(plan, server_round=plan.round + 1)
        if not self.secure:  # a SecAgg+ round counts its own four stages
            self.traffic.sent(self.sent.messages)
            self.traffic.device_rounds += len(self.sent.messages)
        return self.sent.messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, end the round with the round owner, log it."""
        sent, self.sent = self.sent, None
        if sent is None:  # stopped by the privacy budget
            return None, None
        owner = self.owner
        acc = owner.accumulator(sent.plan)
        replies = list(replies)
        self.traffic.received(replies)
        contributed = self.executor.collect(sent, replies, acc)
        self.write_private_events()
        row, batch = self.end_round(sent.plan, acc, contributed)
        self.log_round(row, batch.rejected)
        metrics = MetricRecord({k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)})  # types a MetricRecord takes
        return self.layout.to_arrays(owner.params), metrics

    def end_round(self, plan: RoundPlan, acc: UpdateAccumulator, contributed: np.ndarray) -> tuple[dict[str, Any], Any]:
        """End ``plan``'s round durably, before anything of it is published.

        The round owner ends it (aggregation with the noise, ledger, evaluation); the job's
        checkpoint of the round is written; the round owner commits it, which first appends the
        round to the job's release record (fsynced) and then writes its row. Only after this
        does the caller hand the new model to Flower (docs: :mod:`fedsim.flower.server_state`).
        """
        owner = self.owner
        row, batch = owner.end(plan, acc, contributed=contributed)
        if self.state is not None:
            self.state.save(
                plan.round + 1, owner.state_dict(), run_dir=owner.run_dir, row=row, extra=dict(self.events), auth=self.auth
            )
        owner.commit(row)
        return row, batch

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server evaluates on its held-out split, as the simulator."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    # ------------------------------------------------------------------------------------------
    # running a whole scenario

    def initial_arrays(self) -> ArrayRecord:
        """The global model the next round starts from (the scenario's seeded initial model, or a resumed job's), as an ArrayRecord."""
        return self.layout.to_arrays(self.owner.params)

    def run(self, grid: Grid, *, round_timeout: float = 600.0) -> RunResult:
        """Run every round of the scenario on ``grid`` and write the run directory.

        Parameters
        ----------
        grid:
            The ServerApp's grid (a SuperLink, or Flower's simulation engine).
        round_timeout:
            Seconds to wait for the round's replies; late replies are dropped, the round
            aggregates what arrived.
        """
        owner, sc = self.owner, self.scenario
        self.resume()
        owner.start(progress=self.progress, desc=f"{sc.name} (flower)")
        start = time.perf_counter()
        flwr_logger = logging.getLogger("flwr")
        quiet = _FlowerStrategyProgressFilter()
        flwr_logger.addFilter(quiet)  # fedsim logs each round once (log_round); run_server the summary
        try:
            if sc.rounds > self.offset and owner.stopped_reason == "completed":
                self.start(grid, self.initial_arrays(), num_rounds=sc.rounds - self.offset, timeout=round_timeout)
        finally:
            flwr_logger.removeFilter(quiet)
            owner.close_progress()
        self.write_private_events()  # any withheld after the last round's
        owner.recorder.add_summary_hook(self.summary_extras)
        return owner.finish(time.perf_counter() - start)

    def summary_extras(self, summary: dict[str, Any], private: dict[str, Any], files: RunFiles) -> None:
        """The bridge's part of the run's summaries (a hook of the run recorder, written once with
        the engine's): ``backend``, the job's key file, ``summary.json["flower"]`` and the
        participation ledger (``participation.json``; a DP run: ``private/``)."""
        owner = self.owner
        summary["backend"] = "flower"
        if owner.private and self.state is not None and owner.key_origin == "given":
            summary["noise_key"] = {"kind": "secret", "file": str(self.state.key_path)}
        counts = {
            k: int(self.events.get(k, 0))
            for k in (
                "checkins", "no_reply", "client_error", "declined", "unexpected_reply", "duplicate_claim",
                "unauthenticated_claim",
            )
        }
        roster = {"nodes": len(self.roster), "devices": len(set(self.roster.values()))}
        summary["flower"] = {
            "job_id": self.job_id,
            "resumed_at_round": self.offset,
            # who is sampled is not hidden on Flower: no amplification by sampling is claimed
            "cohort_secret": False,
            **roster,
            **counts,
        }
        # exact, device-dependent figures (declined replies are smaller, a SecAgg+ round fails
        # when devices drop out): public in a run without DP, in private/summary.json in a DP run
        measured: dict[str, Any] = {"traffic": self.traffic.to_dict()}
        if self.secure:
            fl = self.scenario.flower
            summary["flower"]["secure_aggregation"] = {
                "protocol": "SecAgg+ (Flower)",
                "shares": fl.secagg_shares or "cohort",
                "threshold": fl.secagg_threshold or "majority",
                "clipping_range": fl.secagg_clipping_range if fl.secagg_clipping_range is not None else "clip-norm",
                "quantization_range": fl.secagg_quantization_range,
                "modulus": fl.secagg_modulus,
                # array entries in any reply the server received (masked vectors travel as bytes)
                "arrays_received": int(self.events.get("secagg_arrays_received", 0)),
            }
            measured["secagg_rounds"] = int(self.events.get("secagg_rounds", 0))
            measured["secagg_failed"] = int(self.events.get("secagg_failed", 0))
        summary["flower"].update(dict.fromkeys(measured) if owner.private else measured)
        if owner.private:
            # replies that failed, never came or were declined are exact, data-dependent counts:
            # null here, exact in private/summary.json. Roster events (check-ins, claims, the
            # roster's size) stay public, less what follows from a withheld event alone: a
            # node's check-in again after a failed or missing reply, the node's absence from
            # the roster meanwhile (its public record keeps it there until it leaves the grid)
            public = self.executor.public_roster()
            summary["flower"].update(
                nodes=len(public),
                devices=len(set(public.values())),
                **{k: counts[k] - int(self.events.get(WITHHELD + k, 0)) for k in ROSTER_COUNTS},
                **dict.fromkeys(PRIVATE_FLOWER_COUNTS),
            )
            private["flower"] = {**roster, **counts, **measured}
            # who contributed how often is exact, data-dependent state: private in a DP run
            files.private["participation.json"] = self.participation()
        else:
            files.public["participation.json"] = self.participation()

    def resume(self) -> int:
        """Open the job's state: continue from its newest checkpoint; the rounds restored.

        A new job starts its release record (key and data fingerprints). A started job's record
        is read back (another key, or other data, refuse) and is the high-water mark: if the
        newest usable checkpoint is older than the rounds the record holds, those rounds may have
        been published and cannot be run again (devices would decline them, and the same noise on
        another sum gives away the exact sum), so the server refuses in one line naming them and
        what the operator can do (:class:`~fedsim.engine.releases.ReleaseError`). Otherwise the
        run log is cut back to the checkpoint's position, the checkpointed round is recorded as
        released (if the crash came before that) and its row appended, and the private
        diagnostics of later rounds are dropped. A checkpoint of a different scenario or data, or
        a run log that does not extend the checkpoint's, refuses too.
        """
        if self.state is None:
            self.load_prior()
            return 0
        owner, state = self.owner, self.state
        found, failures = state.latest(self.auth)
        if state.releases_path.exists():
            record = owner.open_releases(
                state.releases_path, where=f"job {self.job_id!r}",
                restart=f"start a new job (a new key) that counts this one's rho: {self.new_job_config()}",
            )
        elif found is not None or failures:
            raise ReleaseError(
                f"{state.releases_path}: the job's release record is missing, but {state.checkpoints} holds "
                "checkpoints; cannot tell which rounds were published (a job started by an older fedsim, or "
                "the file was removed); start a new job (a new job-id)"
            )
        else:
            record = owner.create_releases(state.releases_path, run={**owner.run_identity(), "job_id": self.job_id})
        rounds_done = int(found[0]["round"]) if found is not None else 0
        if rounds_done < record.released:
            raise ReleaseError(self.at_risk(rounds_done, record, failures))
        for path, reason in failures:
            logger.warning(
                "fedsim: job %r: checkpoint %s is unusable (%s); the rounds after the previous one were not published",
                self.job_id, path, reason,
            )
        self.load_prior()
        if found is None:
            return 0
        saved, path = found
        # the checkpointed round: recorded as released (unless it was), then its row published
        owner.restore(saved, path, ahead=1, pending_row=json.loads(saved["pending_row"]))
        self.events.update({str(k): int(v) for k, v in saved["flower"].items()})
        self.offset = owner.next_round
        logger.warning(
            "fedsim: job %r resumed after round %d of %d from %s (the privacy ledger continues)",
            self.job_id, self.offset, self.scenario.rounds, path,
        )
        return self.offset

    def at_risk(self, rounds_done: int, record: ReleaseRecord, failures: list[tuple[Path, str]]) -> str:
        """The one-line refusal of a restart whose newest usable checkpoint is behind the record."""
        first, last = rounds_done + 1, record.released
        rounds = f"round {first}" if first == last else f"rounds {first}-{last}"
        usable = f"is after round {rounds_done}" if rounds_done else "is none"
        if failures:
            cause = "; unusable: " + "; ".join(f"{path.name} ({reason})" for path, reason in failures)
        else:
            cause = f"; no later checkpoint in {self.state.checkpoints if self.state else 'the state'}"
        return (
            f"job {self.job_id!r}: {rounds} may have been published ({record.path}) but the newest usable "
            f"checkpoint {usable}{cause}. Continuing would release {rounds} again with other inputs "
            "(devices decline rounds they gave to: the same noise on another sum gives the exact sum away), "
            f"so the job stops. Restore the checkpoint of round {last} from a backup, or start a new job "
            f"(a new key) that counts this one's rho: {self.new_job_config()}"
        )

    def new_job_config(self) -> str:
        """The run config of a new job that counts this job's rho (for refusals)."""
        root = f" state-dir='{self.state.root}'" if self.state is not None else ""
        return f"--run-config \"job-id='NEW-JOB' out-dir='NEW-DIR'{root} prior-jobs='{self.job_id}'\""

    def load_prior(self) -> None:
        """``prior-jobs`` (and the scenario's ``[privacy] prior-runs``): their released rho, for the report."""
        records: list[tuple[str, ReleaseRecord]] = []
        for job in self.prior_jobs:
            if job == self.job_id:
                raise CheckpointError(f"prior-jobs names this job ({job!r}); name the earlier job(s)")
            assert self.state is not None
            other = ServerState(self.state.root, job)
            where = f"prior-jobs: job {job!r}"
            if not other.releases_path.exists():
                raise CheckpointError(
                    f"{where}: no release record in {other.path} (not a job of this state-dir, or one started by an older fedsim)"
                )
            fixed = self.scenario.noise_key_path
            key = other.keys.load(where) if other.keys.exists() or fixed is None else load_key(fixed, where)
            records.append((job, ReleaseRecord.open(other.releases_path, key, key_file=f"{where}: {other.key_path}")))
        records += [(str(run), read_prior_run(run)) for run in self.scenario.prior_run_paths]
        self.owner.prior = prior_report(records, delta=self.scenario.privacy.delta)

    def write_private_events(self) -> None:
        """Append a DP run's withheld device-level events to ``private/flower-events.jsonl``."""
        self.owner.recorder.append_private("flower-events.jsonl", self.executor.take_private_events())

    def participation(self) -> dict[str, Any]:
        """The server's participation ledger (accepted contributions) per device, and the limit."""
        ledger = self.owner.population.server_ledger
        devices = np.flatnonzero(ledger.count > 0)
        return {
            "max_participations": self.limit.max_participations if self.limit else None,
            "min_separation": self.limit.min_separation if self.limit else 0,
            "devices": {str(int(d)): {"count": int(ledger.count[d]), "last_round": int(ledger.last[d]) + 1} for d in devices},
        }

    def log_round(self, row: dict[str, Any], rejected: dict[str, int]) -> None:
        """One log line per round (deployed servers have no progress bar)."""
        parts = [f"round {row['round']}/{self.scenario.rounds}"]
        if self.owner.private:  # exact counts are not released in a DP run (private/diagnostics.jsonl)
            rejected = {}
        else:
            parts.append(f"clients {row['clients']}/{row['eligible']} eligible")
        if rejected:
            parts.append("rejected " + ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())))
        if row["accuracy"] is not None:
            parts.append(f"accuracy {row['accuracy']:.4f}")
        if row["rho"] is not None:
            parts.append(f"rho {row['rho']:.4g}, epsilon {row['epsilon']:.4g} (delta {row['delta']:g})")
        logger.info("fedsim: %s", ", ".join(parts))


class _FlowerStrategyProgressFilter(logging.Filter):
    """Drops the INFO lines of Flower's own ``Strategy.start`` loop while the bridge runs it.

    ``start`` logs every round's metrics (an ``Aggregated MetricRecord`` dict, beside the bridge's
    own one-line round report) and, at the end, its ``Result`` (labelled "ClientApp-side Train
    Metrics" although the bridge's metrics are the server's test metrics and rho, then empty
    evaluate and config records). The filter sits on the ``flwr`` logger itself, so it sees only
    records Flower logs there; the bridge's ``flwr.fedsim`` records and every warning or error
    pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        path = record.pathname.replace("\\", "/")
        return "/flwr/serverapp/strategy/" not in path
