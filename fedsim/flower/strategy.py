"""The bridge: any fedsim :class:`~fedsim.strategy.Strategy` as a Flower Message-API strategy.

:class:`FedsimStrategy` implements Flower's ``flwr.serverapp.strategy.Strategy``
(``configure_train``, ``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``,
``summary``; Flower's own concrete ``start`` drives the rounds) around the fedsim strategy that a
scenario names. Its rounds are begun and ended by the engine's round owner
(:class:`~fedsim.engine.rounds.RoundOwner`: data, model, strategy, population and ledgers,
privacy ledger, run directory), exactly as in the in-process simulator; the client work runs on
the grid through :class:`FlowerGridExecutor`, the Flower implementation of the engine's
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedsim import seeds
from fedsim.client import stated_bits
from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.engine.checkpoint import CheckpointError, CheckpointKey, restore_metrics_log
from fedsim.engine.executors import CohortExecutor
from fedsim.engine.releases import ReleaseError, ReleaseRecord, prior_report, release_digest
from fedsim.engine.rounds import RoundOwner, RoundPlan, RunResult, read_prior_run
from fedsim.engine.rundir import metrics_line
from fedsim.errors import ScenarioError
from fedsim.flower.identity import DeviceKeys, fingerprint
from fedsim.flower.protocol import TrainInstruction, client_scenario_sections
from fedsim.flower.records import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, ParamLayout, RecordError
from fedsim.flower.server_state import ServerState
from fedsim.flower.traffic import Traffic
from fedsim.privacy.events import SampledGaussianEvent
from fedsim.privacy.noise import NoiseKey, NoiseKeyError
from fedsim.scenario import Scenario
from fedsim.strategy import ParticipationLimit
from fedsim.types import CohortChunk
from fedsim.validation import is_int

logger = logging.getLogger("flwr.fedsim")

#: ``summary.json["flower"]`` counts a DP run publishes as ``null`` (exact: ``private/summary.json``)
PRIVATE_FLOWER_COUNTS = ("no_reply", "client_error", "declined", "unexpected_reply")
#: ``summary.json["flower"]`` roster counts: public, but a DP run leaves out the withheld ones
#: (a node's check-in after a failed or missing reply; exact: ``private/summary.json``)
ROSTER_COUNTS = ("checkins", "duplicate_claim", "unauthenticated_claim")
#: prefix of the :attr:`FlowerGridExecutor.events` keys that count withheld roster events
WITHHELD = "withheld_"


@dataclass
class SentRound:
    """The train messages of one round, for :meth:`FlowerGridExecutor.collect`."""

    plan: RoundPlan
    messages: list[Message]
    devices: list[int]


class FlowerGridExecutor(CohortExecutor):
    """The cohort trained by Flower nodes: one ``train`` message per selected device.

    Keeps the roster ``node -> device`` of the nodes that checked in (:meth:`refresh_roster`),
    sends a round's messages (:meth:`messages`) and validates and reduces the replies in the
    simulator's order and chunking (:meth:`collect`); :meth:`train` does both over
    ``grid.send_and_receive``. Replies rejected before the accumulator sees them count as
    ``malformed_record``, ``wrong_shape``, ``wrong_dtype``, ``device_mismatch`` or
    ``bad_example_count``, next to the accumulator's own reasons.
    """

    def __init__(
        self,
        *,
        layout: ParamLayout,
        num_devices: int,
        chunk_size: int,
        run_seed: int,
        limit: ParticipationLimit | None,
        job_id: str,
        sections: dict[str, Any],
        min_nodes: int = 1,
        checkin_timeout: float = 120.0,
        grid: Grid | None = None,
        round_timeout: float = 600.0,
        device_keys: DeviceKeys | None = None,
    ) -> None:
        self.layout = layout
        self.num_devices = num_devices
        self.chunk_size = chunk_size
        self.run_seed = run_seed
        self.limit = limit
        self.job_id = job_id
        self.sections = sections
        self.min_nodes = min_nodes
        self.checkin_timeout = float(checkin_timeout)
        self.grid = grid
        self.round_timeout = float(round_timeout)
        #: node id -> device id of the nodes that checked in
        self.roster: dict[int, int] = {}
        #: check-in message id -> node id, awaiting a reply
        self.pending_checkins: dict[str, int] = {}
        #: nodes that failed a check-in (no partition-id, unavailable): never asked again
        self.gone: set[int] = set()
        #: nodes whose claim of a device id was refused (the id was held), by the id they claimed
        self.refused: dict[int, int] = {}
        #: Flower-level counts: no_reply, client_error, declined, unexpected_reply, checkins,
        #: duplicate_claim, unauthenticated_claim; ``withheld_<count>``: how many of ``<count>`` a
        #: DP run kept out of the log (kept here so that a server checkpoint carries them)
        self.events: Counter[str] = Counter()
        #: device id -> fingerprint of its issued public key (``None``: claims are not authenticated)
        self.device_keys = device_keys
        #: node id -> fingerprint of the node's authenticated public key (as the SuperLink lists it)
        self.node_keys: dict[int, str] = {}
        #: a DP run: device-level events of a round (rejections, declines, failures, missing
        #: replies) are exact, data-dependent facts, kept out of the log (:attr:`private_events`)
        self.private = False
        #: the withheld events since the last :meth:`take_private_events`
        self.private_events: list[dict[str, Any]] = []
        #: a DP run: nodes taken off the roster after a withheld event (a failed or missing
        #: reply), by device. The public view (:meth:`public_roster`) still holds them, as it
        #: would had the event not happened: their check-in again is withheld too, and the
        #: device id stays theirs until they leave the grid
        self.withdrawn: dict[int, int] = {}
        #: nodes whose pending check-in is such a check-in again (its outcome is withheld)
        self.rechecking: set[int] = set()
        #: the round the next check-ins precede (1-based), for the withheld events' records
        self.next_round = 1

    # -- the contract -------------------------------------------------------------------------
    def train(self, plan: RoundPlan, acc: UpdateAccumulator) -> np.ndarray:
        """Send the round's messages over :attr:`grid`, wait for the replies, reduce them."""
        if self.grid is None:
            raise RuntimeError("FlowerGridExecutor.train needs a grid")
        sent = self.messages(plan, server_round=plan.round + 1)
        replies = self.grid.send_and_receive(sent.messages, timeout=self.round_timeout)
        return self.collect(sent, replies, acc)

    # -- the two halves -----------------------------------------------------------------------
    def connected(self) -> np.ndarray:
        """Boolean mask over devices: those on the roster."""
        mask = np.zeros(self.num_devices, dtype=bool)
        mask[list(self.roster.values())] = True
        return mask

    def messages(self, plan: RoundPlan, *, server_round: int) -> SentRound:
        """One ``train`` message per selected device on the roster."""
        node_of = {device: node for node, device in self.roster.items()}
        global_arrays = self.layout.to_arrays(plan.params)
        messages: list[Message] = []
        devices: list[int] = []
        for dev in (int(d) for d in plan.cohort):
            node = node_of.get(dev)
            if node is None:  # names a device of the cohort: withheld in a DP run
                self.device_event(
                    "not_checked_in", server_round, dev, None,
                    "fedsim: round %d: strategy selected device %d, which is not checked in; skipped", server_round, dev,
                    level=logging.ERROR,
                )
                continue
            instruction = TrainInstruction(
                device_id=dev,
                task_seed=seeds.client_seed(self.run_seed, plan.round, dev),
                train=plan.config,
                limit=self.limit,
                job_id=self.job_id,
                scenario=self.sections,
            )
            content = RecordDict({ARRAYS_KEY: global_arrays, CONFIG_KEY: instruction.to_config()})
            messages.append(Message(content, node, MessageType.TRAIN, group_id=str(server_round)))
            devices.append(dev)
        return SentRound(plan, messages, devices)

    def collect(self, sent_round: SentRound, replies: Iterable[Message], acc: UpdateAccumulator) -> np.ndarray:
        """Validate the replies and fold them into ``acc``; the devices that trained."""
        server_round = sent_round.plan.round + 1
        self.next_round = server_round + 1
        sent = {
            m.metadata.message_id: (m.metadata.dst_node_id, dev)
            for m, dev in zip(sent_round.messages, sent_round.devices, strict=True)
        }
        valid: dict[int, tuple[torch.Tensor, int, float, int, bool | None]] = {}
        declined: list[int] = []
        for reply in replies:
            key = reply.metadata.reply_to_message_id
            if key not in sent:
                self.events["unexpected_reply"] += 1
                self.device_event("unexpected_reply", server_round, None, None, "fedsim: round %d: ignoring a reply to an unknown message", server_round)
                continue
            node, dev = sent.pop(key)
            if reply.has_error():
                self.events["client_error"] += 1
                self.device_event(
                    "client_error", server_round, dev, node,
                    "fedsim: round %d: node %d (device %d) failed: %s", server_round, node, dev, reply.error.reason,
                )
                self.drop(node)
                continue
            try:
                outcome = self.decode(reply, dev)
            except RecordError as exc:
                acc.rejected[exc.reason] += 1
                self.device_event(
                    exc.reason, server_round, dev, node,
                    "fedsim: round %d: rejected update of device %d (node %d): %s: %s", server_round, dev, node, exc.reason, exc,
                )
                continue
            if outcome is None:
                declined.append(dev)
                self.events["declined"] += 1
                self.device_event(
                    "declined", server_round, dev, node,
                    "fedsim: round %d: device %d (node %d) declined: its participation ledger forbids the round", server_round, dev, node,
                )
                continue
            valid[dev] = outcome
        for node, dev in sent.values():
            self.events["no_reply"] += 1
            self.device_event(
                "no_reply", server_round, dev, node,
                "fedsim: round %d: no reply from device %d (node %d) before the deadline", server_round, dev, node,
            )
            self.drop(node)

        # reduce in the simulator's order and chunking (cohort order, chunk-size rows per chunk)
        rows = [d for d in sent_round.devices if d in valid]
        for start in range(0, len(rows), self.chunk_size):
            ids = rows[start : start + self.chunk_size]
            chunk = CohortChunk(
                device_ids=np.asarray(ids, dtype=np.int64),
                deltas=torch.stack([valid[d][0] for d in ids]),
                num_examples=torch.tensor([valid[d][1] for d in ids], dtype=torch.int64),
                losses=torch.tensor([valid[d][2] for d in ids], dtype=torch.float32),
                rounds=np.asarray([valid[d][3] for d in ids], dtype=np.int64),
                below_clip=stated_bits([valid[d][4] for d in ids]),
            )
            before = Counter(acc.rejected)
            accepted = acc.add(chunk)
            if not accepted.all():
                bad = [dev for dev, ok in zip(ids, accepted, strict=True) if not ok]
                reasons = ", ".join(f"{k}={v}" for k, v in sorted((Counter(acc.rejected) - before).items()))
                self.device_event(
                    "rejected", server_round, None, None,
                    "fedsim: round %d: rejected update(s) of device(s) %s: %s", server_round, bad, reasons,
                )
        # devices remember what they were asked to contribute (a device that declined did not)
        return np.asarray([d for d in sent_round.devices if d not in declined], dtype=np.int64)

    def device_event(
        self, event: str, round: int, device: int | None, node: int | None, fmt: str, *args: Any, level: int = logging.WARNING
    ) -> None:
        """Log a device-level event of a round, or (a DP run) keep it for the private record."""
        if not self.private:
            logger.log(level, fmt, *args)
            return
        self.private_events.append({"round": round, "event": event, "device": device, "node": node, "message": fmt % args})

    def roster_event(
        self, event: str, node: int, device: Any, fmt: str, *args: Any, withheld: bool, count: str | None = None,
        level: int = logging.WARNING,
    ) -> None:
        """A check-in's outcome: logged (roster events are public), or kept private when ``withheld``.

        ``withheld``: the check-in again of a node taken off the roster after a withheld event
        (:attr:`withdrawn`); in a DP run it would tell that event. ``count``: the
        :attr:`events` key it counts in (withheld, also in ``withheld_<count>``).
        """
        if count is not None:
            self.events[count] += 1
        if not withheld:
            logger.log(level, fmt, *args)
            return
        if count is not None:
            self.events[WITHHELD + count] += 1
        dev = int(device) if is_int(device) else None
        self.private_events.append({"round": self.next_round, "event": event, "device": dev, "node": node, "message": fmt % args})

    def take_private_events(self) -> list[dict[str, Any]]:
        """The withheld device-level events, emptied."""
        events, self.private_events = self.private_events, []
        return events

    # -- replies and the roster -----------------------------------------------------------------
    def decode(self, reply: Message, device: int) -> tuple[torch.Tensor, int, float, int, bool | None] | None:
        """A reply's (delta, examples, loss, round trained for, adaptive clipping's bit or ``None``);
        ``None`` when the device declined."""
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
        if not is_int(n) or n < 0:
            raise RecordError("bad_example_count", f"num-examples is {n!r}")
        trained_for = metrics.get("round")
        if not is_int(trained_for):
            raise RecordError("malformed_record", f"round is {trained_for!r}")
        loss = metrics.get("loss", float("nan"))
        bit = metrics.get("below-clip")
        if bit is not None and bit not in (0, 1):
            raise RecordError("malformed_record", f"below-clip is {bit!r}")
        below = None if bit is None else bool(bit)
        return delta, n, float(loss) if isinstance(loss, int | float) else float("nan"), trained_for, below

    def drop(self, node: int) -> None:
        """Take a node off the roster; it is asked to check in again.

        Called after a failed or missing reply; in a DP run that event is withheld, and so is
        everything that follows from it alone (:attr:`withdrawn`).
        """
        device = self.roster.pop(node, None)
        if self.private and device is not None:
            self.withdrawn[node] = device

    def public_roster(self) -> dict[int, int]:
        """node id -> device id as the public record shows it: the roster and :attr:`withdrawn`."""
        return {**self.withdrawn, **self.roster}

    def refresh_roster(self, grid: Grid, *, wait: bool) -> None:
        """Ask new nodes for their device ids; admit the answers that have arrived.

        With ``wait``, keep polling until at least ``min_nodes`` nodes are on the roster; fewer
        after ``checkin_timeout`` seconds is an error.
        """
        deadline = time.monotonic() + self.checkin_timeout
        while True:
            listed = self.list_nodes(grid)
            for node in [n for n in self.public_roster() if n not in listed]:
                # leaving the grid is public (availability), for a withdrawn node too: the public
                # record still has it on the roster
                device = self.roster.pop(node, None)
                device = self.withdrawn.pop(node, device)
                logger.warning("fedsim: node %d (device %d) left", node, device)
            asking = set(self.pending_checkins.values())
            held = set(self.public_roster().values())
            new = [
                n
                for n in sorted(listed)
                if n not in self.roster and n not in asking and n not in self.gone
                and self.refused.get(n) not in held  # asked again once the id it claimed is free
            ]
            if new:
                queries = [Message(RecordDict(), n, MessageType.QUERY) for n in new]
                for msg_id, node in zip(grid.push_messages(queries), new, strict=True):
                    if msg_id:
                        self.pending_checkins[msg_id] = node
                        if node in self.withdrawn:
                            self.rechecking.add(node)
            if self.pending_checkins:
                for reply in grid.pull_messages(list(self.pending_checkins)):
                    self.admit(reply)
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

    def list_nodes(self, grid: Grid) -> set[int]:
        """The node ids the grid lists; with a device key roster, their public keys too."""
        if self.device_keys is None:
            return {int(n) for n in grid.get_node_ids()}
        listed = set()
        for info in grid.get_nodes():
            node = int(info.node_id)
            listed.add(node)
            if node not in self.node_keys and info.public_key:
                try:
                    self.node_keys[node] = fingerprint(bytes(info.public_key))
                except ValueError:
                    logger.warning("fedsim: node %d has a public key that is not an EC key; its claims are refused", node)
        return listed

    def authenticated(self, node: int, device: int) -> bool:
        """Whether ``node``'s authenticated key is the one issued for ``device`` (always, without a roster)."""
        if self.device_keys is None:
            return True
        issued = self.device_keys.get(device)
        return issued is not None and self.node_keys.get(node) == issued

    def admit(self, reply: Message) -> None:
        """Put the node that answered a check-in on the roster (or mark it gone).

        The outcome of a withdrawn node's check-in again is withheld in a DP run (it follows from
        a withheld event); every other check-in is a public roster event.
        """
        node = self.pending_checkins.pop(reply.metadata.reply_to_message_id, None)
        if node is None:
            return
        withheld = node in self.rechecking
        self.rechecking.discard(node)
        if reply.has_error():
            self.gone.add(node)
            self.roster_event(
                "checkin_failed", node, None, "fedsim: node %d did not check in: %s", node, reply.error.reason, withheld=withheld
            )
            return
        metrics = reply.content.metric_records.get(METRICS_KEY)
        device = metrics.get("device-id") if metrics is not None else None
        n = self.num_devices
        if not is_int(device) or not 0 <= device < n:
            self.gone.add(node)
            self.roster_event(
                "bad_device_id", node, None, "fedsim: node %d checked in with device id %r, outside [0, %d); ignored",
                node, device, n, withheld=withheld,
            )
            return
        if not self.authenticated(node, device):
            # the node's key is not the one issued for the device it claims: never admitted (its
            # key cannot change), never displacing the device's own node
            self.gone.add(node)
            self.roster_event(
                "unauthenticated_claim", node, device,
                "fedsim: node %d claimed device %d but its SuperNode key is not the one issued for it: claim refused",
                node, device, withheld=withheld, count="unauthenticated_claim",
            )
            return
        holder = next((other for other, dev in self.public_roster().items() if dev == device and other != node), None)
        if holder is not None:
            # a second claim of a rostered device id: refused and counted, never evicting the first
            # (a restarted SuperNode gets its id once the old node has left the grid)
            self.refused[node] = device
            self.roster_event(
                "duplicate_claim", node, device,
                "fedsim: node %d claimed device %d, which node %d holds: claim refused (the first claim stands)",
                node, device, holder, withheld=withheld, count="duplicate_claim",
            )
            return
        self.refused.pop(node, None)
        self.withdrawn.pop(node, None)
        self.roster[node] = device
        self.roster_event(
            "checkin", node, device, "fedsim: node %d checked in as device %d", node, device,
            withheld=withheld, count="checkins", level=logging.INFO,
        )


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
        result = owner.finish(time.perf_counter() - start)
        result.summary["backend"] = "flower"
        if owner.private and self.state is not None and owner.key_origin == "given":
            result.summary["noise_key"] = {"kind": "secret", "file": str(self.state.key_path)}
        counts = {
            k: int(self.events.get(k, 0))
            for k in (
                "checkins", "no_reply", "client_error", "declined", "unexpected_reply", "duplicate_claim",
                "unauthenticated_claim",
            )
        }
        roster = {"nodes": len(self.roster), "devices": len(set(self.roster.values()))}
        result.summary["flower"] = {
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
            result.summary["flower"]["secure_aggregation"] = {
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
        result.summary["flower"].update(dict.fromkeys(measured) if owner.private else measured)
        if owner.private:
            # replies that failed, never came or were declined are exact, data-dependent counts:
            # null here, exact in private/summary.json. Roster events (check-ins, claims, the
            # roster's size) stay public, less what follows from a withheld event alone: a
            # node's check-in again after a failed or missing reply, the node's absence from
            # the roster meanwhile (its public record keeps it there until it leaves the grid)
            public = self.executor.public_roster()
            result.summary["flower"].update(
                nodes=len(public),
                devices=len(set(public.values())),
                **{k: counts[k] - int(self.events.get(WITHHELD + k, 0)) for k in ROSTER_COUNTS},
                **dict.fromkeys(PRIVATE_FLOWER_COUNTS),
            )
            counts = {**roster, **counts, **measured}
        if owner.run_dir is not None:
            owner.run_dir.write_json("summary.json", result.summary)
            # who contributed how often is exact, data-dependent state: private in a DP run
            if owner.private:
                (owner.run_dir.path / "private").mkdir(mode=0o700, exist_ok=True)
                owner.run_dir.write_json("private/participation.json", self.participation())
                private_summary = owner.run_dir.path / "private" / "summary.json"
                exact = json.loads(private_summary.read_text(encoding="utf-8")) if private_summary.exists() else {}
                owner.run_dir.write_json("private/summary.json", {**exact, "flower": counts})
            else:
                owner.run_dir.write_json("participation.json", self.participation())
        return result

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
        owner.check_state(saved, source=str(path), ahead=1)
        if owner.run_dir is not None:
            restore_metrics_log(owner.run_dir, saved["metrics"], path)
        restored = {k: v for k, v in saved.items() if k not in ("metrics", "pending_row", "flower")}
        owner.load_state_dict(restored, source=str(path), ahead=1)
        # the checkpointed round: recorded as released (unless it was), then its row published
        row = json.loads(saved["pending_row"])
        record.release(owner.next_round, release_digest(metrics_line(row), owner.params), owner.released_event(owner.next_round))
        if owner.run_dir is not None:
            owner.run_dir.append_metrics(row)
        owner.metrics.append(row)
        owner.cut_diagnostics(owner.next_round)
        owner.resumed = True
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
            try:
                key = NoiseKey.load(other.key_path) if other.key_path.exists() else NoiseKey.load(self.scenario.noise_key_path or other.key_path)
            except NoiseKeyError as exc:
                raise CheckpointError(f"{where}: {exc}") from None
            records.append((job, ReleaseRecord.open(other.releases_path, key, key_file=f"{where}: {other.key_path}")))
        records += [(str(run), read_prior_run(run)) for run in self.scenario.prior_run_paths]
        self.owner.prior = prior_report(records, delta=self.scenario.privacy.delta)

    def write_private_events(self) -> None:
        """Append a DP run's withheld device-level events to ``private/flower-events.jsonl``."""
        events = self.executor.take_private_events()
        run_dir = self.owner.run_dir
        if not events or run_dir is None:
            return
        private = run_dir.path / "private"
        private.mkdir(mode=0o700, exist_ok=True)
        with open(private / "flower-events.jsonl", "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(e) + "\n" for e in events))

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
