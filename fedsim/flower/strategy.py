"""The bridge: any fedsim :class:`~fedsim.strategy.Strategy` as a Flower Message-API strategy.

:class:`FedsimStrategy` implements Flower's ``flwr.serverapp.strategy.Strategy``
(``configure_train``, ``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``,
``summary``; Flower's own concrete ``start`` drives the rounds) around the fedsim strategy that a
scenario names, and runs each round exactly as the in-process simulator does, built from the
simulator's own pieces (:class:`~fedsim.engine.simulation.Simulation` holds the data, the model,
the strategy, the population and its ledgers, the privacy ledger and the run directory):

1. the strategy's privacy event for the round; the run stops before a round that would exceed the
   scenario's ``max-rho`` / ``max-epsilon``;
2. **check-in**: every Flower node the SuperLink lists is asked once (a ``query`` message) for its
   device id, its ``partition-id``; nodes that answer form the roster ``node -> device``. The
   first round waits for ``min_nodes`` check-ins; later rounds admit new nodes (a restarted
   SuperNode gets a new node id) as their answers arrive, without waiting. A node that misses a reply deadline or answers with an error
   leaves the roster and is asked to check in again;
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

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedsim import seeds
from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.engine.simulation import RunResult, Simulation, progress_postfix
from fedsim.flower.protocol import TrainInstruction, client_scenario_sections
from fedsim.flower.records import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, ParamLayout, RecordError
from fedsim.scenario import Scenario
from fedsim.types import CohortChunk, TrainConfig

logger = logging.getLogger("flwr.fedsim")


@dataclass
class _Round:
    """What :meth:`FedsimStrategy.configure_train` sent, for :meth:`aggregate_train`."""

    round: int
    event: Any
    params: torch.Tensor
    eligible: np.ndarray
    cohort: np.ndarray
    config: TrainConfig
    messages: list[Message]
    devices: list[int]


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
    ) -> None:
        if min_nodes < 1:
            raise ValueError(f"min_nodes must be >= 1, got {min_nodes}")
        if not checkin_timeout > 0:
            raise ValueError(f"checkin_timeout must be > 0, got {checkin_timeout}")
        # Flower executes the rounds: the recorded scenario says so, and the engine starts no
        # executor of its own (such as the "ray" backend's workers)
        scenario = replace(scenario, engine=replace(scenario.engine, backend="flower"))
        self.scenario = scenario
        self.sim = Simulation(scenario, run_dir=run_dir, progress=False)
        self.strategy = self.sim.strategy
        self.layout = ParamLayout.of(self.sim.model)
        self.job_id = job_id
        self.min_nodes = min_nodes
        self.checkin_timeout = float(checkin_timeout)
        self.progress = progress
        self.limit = self.strategy.participation_limit()
        self.sections = client_scenario_sections(scenario)
        #: node id -> device id of the nodes that checked in
        self.roster: dict[int, int] = {}
        #: check-in message id -> node id, awaiting a reply
        self._checkins: dict[str, int] = {}
        #: nodes that failed a check-in (no partition-id, unavailable): never asked again
        self._gone: set[int] = set()
        #: nodes whose claim of a device id was refused (the id was held), by the id they claimed
        self._refused: dict[int, int] = {}
        self._round: _Round | None = None
        self._first_checkin_done = False
        #: Flower-level counts: no_reply, client_error, declined, unexpected_reply, checkins
        self.events: Counter[str] = Counter()
        self._bar: Any = None

    # ------------------------------------------------------------------------------------------
    # Flower Strategy interface

    def summary(self) -> None:
        """Log what is wrapped and how it is enforced."""
        s, sc = self.strategy, self.scenario
        limit = self.limit
        logger.info(
            "fedsim strategy %r (%s, weighting=%s) on %d devices, %d per round, %d rounds",
            sc.strategy.name, type(s).__name__, s.weighting, self.sim.data.num_devices, sc.clients_per_round, sc.rounds,
        )
        if limit is not None:
            logger.info(
                "participation limit: max %s contributions, %d rounds between (server ledger + device ledgers, job %r)",
                limit.max_participations, limit.min_separation, self.job_id,
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check nodes in, select the round's cohort as the simulator would, build its messages."""
        self._round = None
        sim, sc = self.sim, self.scenario
        r = server_round - 1
        if sim.stopped_reason != "completed":
            return []
        event = self.strategy.privacy_event(round=r)
        reason = sim._budget_exceeded(r, event)
        if reason is not None:
            sim.stopped_reason = reason
            logger.warning("fedsim: stopping before round %d: %s", server_round, reason)
            return []
        self._refresh_roster(grid, wait=not self._first_checkin_done)
        self._first_checkin_done = True
        params = self.layout.to_flat(arrays)
        connected = np.zeros(sim.data.num_devices, dtype=bool)
        connected[list(self.roster.values())] = True
        checked_in = sim.population.check_in(r, seeds.round_rng(sc.seed, seeds.STREAM_AVAILABILITY, r))
        eligible = checked_in[connected[checked_in]]
        # a DP run selects from its secret key (sim.selection_rng), never the public seed
        cohort = self.strategy.select(round=r, eligible=eligible, rng=sim.selection_rng(r))
        train_config = self.strategy.configure_client(round=r, base=replace(sim.base_config, round=r))
        node_of = {device: node for node, device in self.roster.items()}
        global_arrays = self.layout.to_arrays(params)
        messages: list[Message] = []
        devices: list[int] = []
        for dev in (int(d) for d in cohort):
            node = node_of.get(dev)
            if node is None:
                logger.error("fedsim: strategy selected device %d, which is not checked in; skipped", dev)
                continue
            instruction = TrainInstruction(
                device_id=dev,
                task_seed=seeds.client_seed(sc.seed, r, dev),
                train=train_config,
                limit=self.limit,
                job_id=self.job_id,
                scenario=self.sections,
            )
            content = RecordDict({ARRAYS_KEY: global_arrays, CONFIG_KEY: instruction.to_config()})
            messages.append(Message(content, node, MessageType.TRAIN, group_id=str(server_round)))
            devices.append(dev)
        self._round = _Round(r, event, params, eligible, np.asarray(devices, dtype=np.int64), train_config, messages, devices)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, aggregate with the fedsim strategy, account, evaluate, log."""
        st, self._round = self._round, None
        if st is None:  # stopped by the privacy budget
            return None, None
        sim, sc = self.sim, self.scenario
        r = st.round
        sent = {m.metadata.message_id: (m.metadata.dst_node_id, dev) for m, dev in zip(st.messages, st.devices, strict=True)}
        acc = UpdateAccumulator(
            num_params=self.layout.num_params,
            round=r,
            clip_norm=st.config.clip_norm,
            weighting=self.strategy.weighting,
            ledger=sim.population.server_ledger,
            num_devices=sim.data.num_devices,
            keep_individual=self.strategy.needs_individual_updates,
            max_norm=sc.engine.max_update_norm,
            max_examples=sc.engine.max_examples,
        )
        valid: dict[int, tuple[torch.Tensor, int, float, int]] = {}
        declined: list[int] = []
        for reply in replies:
            key = reply.metadata.reply_to_message_id
            if key not in sent:
                self.events["unexpected_reply"] += 1
                logger.warning("fedsim: round %d: ignoring a reply to an unknown message", server_round)
                continue
            node, dev = sent.pop(key)
            if reply.has_error():
                self.events["client_error"] += 1
                logger.warning("fedsim: round %d: node %d (device %d) failed: %s", server_round, node, dev, reply.error.reason)
                self._drop(node)
                continue
            try:
                outcome = self._decode(reply, dev)
            except RecordError as exc:
                acc.rejected[exc.reason] += 1
                logger.warning(
                    "fedsim: round %d: rejected update of device %d (node %d): %s: %s", server_round, dev, node, exc.reason, exc
                )
                continue
            if outcome is None:
                declined.append(dev)
                self.events["declined"] += 1
                logger.warning("fedsim: round %d: device %d (node %d) declined: its participation ledger forbids the round", server_round, dev, node)
                continue
            valid[dev] = outcome
        for node, dev in sent.values():
            self.events["no_reply"] += 1
            logger.warning("fedsim: round %d: no reply from device %d (node %d) before the deadline", server_round, dev, node)
            self._drop(node)

        # reduce in the simulator's order and chunking (cohort order, chunk-size rows per chunk)
        rows = [d for d in st.devices if d in valid]
        size = sc.engine.chunk_size
        for start in range(0, len(rows), size):
            ids = rows[start : start + size]
            chunk = CohortChunk(
                device_ids=np.asarray(ids, dtype=np.int64),
                deltas=torch.stack([valid[d][0] for d in ids]),
                num_examples=torch.tensor([valid[d][1] for d in ids], dtype=torch.int64),
                losses=torch.tensor([valid[d][2] for d in ids], dtype=torch.float32),
                rounds=np.asarray([valid[d][3] for d in ids], dtype=np.int64),
            )
            before = Counter(acc.rejected)
            accepted = acc.add(chunk)
            if not accepted.all():
                bad = [dev for dev, ok in zip(ids, accepted, strict=True) if not ok]
                reasons = ", ".join(f"{k}={v}" for k, v in sorted((Counter(acc.rejected) - before).items()))
                logger.warning("fedsim: round %d: rejected update(s) of device(s) %s: %s", server_round, bad, reasons)
        # devices remember what they were asked to contribute (a device that declined did not);
        # the server's ledger holds what it accepted
        row, batch = sim.finish_round(
            r,
            event=st.event,
            eligible=st.eligible,
            contributed=np.asarray([d for d in st.devices if d not in declined], dtype=np.int64),
            acc=acc,
            params=st.params,
        )
        sim.metrics.append(row)
        sim.next_round = r + 1
        if sim.run_dir is not None:
            sim.run_dir.append_metrics(row)
        self._log_round(row, batch.rejected)
        metrics = MetricRecord({k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        return self.layout.to_arrays(sim.params), metrics

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
        """The scenario's seeded initial model, as an ArrayRecord."""
        return self.layout.to_arrays(self.sim.params)

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
        sim, sc = self.sim, self.scenario
        if sim.run_dir is not None:
            sim.run_dir.write_config(sc.to_dict())
            sim.run_dir.reset_metrics()
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=sc.rounds, desc=f"{sc.name} (flower)", unit="round", dynamic_ncols=True)
        start = time.perf_counter()
        flwr_logger = logging.getLogger("flwr")
        quiet = _FlowerStrategyProgressFilter()
        flwr_logger.addFilter(quiet)  # fedsim logs each round once (_log_round); run_server the summary
        try:
            self.start(grid, self.initial_arrays(), num_rounds=sc.rounds, timeout=round_timeout)
        finally:
            flwr_logger.removeFilter(quiet)
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        result = sim._finish(time.perf_counter() - start)
        result.summary["backend"] = "flower"
        result.summary["flower"] = {
            "job_id": self.job_id,
            "nodes": len(self.roster),
            "devices": len(set(self.roster.values())),
            **{
                k: int(self.events.get(k, 0))
                for k in ("checkins", "no_reply", "client_error", "declined", "unexpected_reply", "duplicate_claim")
            },
        }
        if sim.run_dir is not None:
            sim.run_dir.write_json("summary.json", result.summary)
            # who contributed how often is exact, data-dependent state: private in a DP run
            if sim.private:
                (sim.run_dir.path / "private").mkdir(mode=0o700, exist_ok=True)
                sim.run_dir.write_json("private/participation.json", self.participation())
            else:
                sim.run_dir.write_json("participation.json", self.participation())
        return result

    def participation(self) -> dict[str, Any]:
        """The server's participation ledger (accepted contributions) per device, and the limit."""
        ledger = self.sim.population.server_ledger
        devices = np.flatnonzero(ledger.count > 0)
        return {
            "max_participations": self.limit.max_participations if self.limit else None,
            "min_separation": self.limit.min_separation if self.limit else 0,
            "devices": {str(int(d)): {"count": int(ledger.count[d]), "last_round": int(ledger.last[d]) + 1} for d in devices},
        }

    # ------------------------------------------------------------------------------------------
    # helpers

    def _decode(self, reply: Message, device: int) -> tuple[torch.Tensor, int, float, int] | None:
        """A reply's (delta, examples, loss, round trained for); ``None`` when the device declined."""
        content = reply.content
        metrics = content.metric_records.get(METRICS_KEY)
        if metrics is None:
            raise RecordError("malformed_record", "reply has no metrics record")
        if metrics.get("device-id") != device:
            raise RecordError("device_mismatch", f"reply claims device {metrics.get('device-id')!r}")
        if metrics.get("declined") == 1:
            return None
        arrays = content.array_records.get(ARRAYS_KEY)
        if arrays is None:
            raise RecordError("malformed_record", "reply has no arrays record")
        delta = self.layout.to_flat(arrays)
        n = metrics.get("num-examples")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise RecordError("bad_example_count", f"num-examples is {n!r}")
        trained_for = metrics.get("round")
        if isinstance(trained_for, bool) or not isinstance(trained_for, int):
            raise RecordError("malformed_record", f"round is {trained_for!r}")
        loss = metrics.get("loss", float("nan"))
        return delta, n, float(loss) if isinstance(loss, int | float) else float("nan"), trained_for

    def _drop(self, node: int) -> None:
        """Take a node off the roster; it is asked to check in again."""
        self.roster.pop(node, None)

    def _refresh_roster(self, grid: Grid, *, wait: bool) -> None:
        """Ask new nodes for their device ids; admit the answers that have arrived.

        With ``wait``, keep polling until at least ``min_nodes`` nodes are on the roster; fewer
        after ``checkin_timeout`` seconds is an error.
        """
        deadline = time.monotonic() + self.checkin_timeout
        while True:
            listed = {int(n) for n in grid.get_node_ids()}
            for node in [n for n in self.roster if n not in listed]:
                logger.warning("fedsim: node %d (device %d) left", node, self.roster.pop(node))
            asking = set(self._checkins.values())
            held = set(self.roster.values())
            new = [
                n
                for n in sorted(listed)
                if n not in self.roster and n not in asking and n not in self._gone
                and self._refused.get(n) not in held  # asked again once the id it claimed is free
            ]
            if new:
                queries = [Message(RecordDict(), n, MessageType.QUERY) for n in new]
                for msg_id, node in zip(grid.push_messages(queries), new, strict=True):
                    if msg_id:
                        self._checkins[msg_id] = node
            if self._checkins:
                for reply in grid.pull_messages(list(self._checkins)):
                    self._admit(reply)
            if not wait:
                return
            if len(self.roster) >= self.min_nodes:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(self.roster)} node(s) checked in within {self.checkin_timeout:g} s, "
                    f"min-nodes is {self.min_nodes}"
                )
            time.sleep(0.5)

    def _admit(self, reply: Message) -> None:
        node = self._checkins.pop(reply.metadata.reply_to_message_id, None)
        if node is None:
            return
        if reply.has_error():
            self._gone.add(node)
            logger.warning("fedsim: node %d did not check in: %s", node, reply.error.reason)
            return
        metrics = reply.content.metric_records.get(METRICS_KEY)
        device = metrics.get("device-id") if metrics is not None else None
        n = self.sim.data.num_devices
        if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < n:
            self._gone.add(node)
            logger.warning("fedsim: node %d checked in with device id %r, outside [0, %d); ignored", node, device, n)
            return
        holder = next((other for other, dev in self.roster.items() if dev == device and other != node), None)
        if holder is not None:
            # a second claim of a rostered device id: refused and counted, never evicting the first
            # (a restarted SuperNode gets its id once the old node has left the grid)
            self._refused[node] = device
            self.events["duplicate_claim"] += 1
            logger.warning(
                "fedsim: node %d claimed device %d, which node %d holds: claim refused (the first claim stands)",
                node, device, holder,
            )
            return
        self._refused.pop(node, None)
        self.roster[node] = device
        self.events["checkins"] += 1
        logger.info("fedsim: node %d checked in as device %d", node, device)

    def _log_round(self, row: dict[str, Any], rejected: dict[str, int]) -> None:
        parts = [f"round {row['round']}/{self.scenario.rounds}"]
        if self.sim.private:  # exact counts are not released in a DP run (private/diagnostics.jsonl)
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
        if self._bar is not None:  # postfix first: update() redraws, showing this round's own figures
            self._bar.set_postfix(progress_postfix(row), refresh=False)
            self._bar.update(1)


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

