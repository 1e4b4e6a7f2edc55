"""The Flower implementation of the engine's cohort executor: one ``train`` message per selected device.

:class:`FlowerGridExecutor` is what :class:`~fedsim.flower.strategy.FedsimStrategy` hands a
round's plan to (``backend = "flower"``; the in-process and Ray executors are in
:mod:`fedsim.engine.executors` and :mod:`fedsim.engine.ray_backend`). It keeps the roster
``node -> device`` of the nodes that checked in (a ``query`` message answered with the node's
``partition-id``), sends the round's train messages, and validates and reduces the replies in
the simulator's order and chunking, so a Flower round folds the same updates into the same
:class:`~fedsim.engine.aggregation.UpdateAccumulator` as an in-process round. In a DP run the
device-level events of a round (failed, missing or declined replies, and what follows from them
alone) are withheld from the log and kept for the run's private record.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim import seeds
from fedsim.client import stated_bits
from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.engine.executors import CohortExecutor
from fedsim.engine.rounds import RoundPlan
from fedsim.flower.identity import DeviceKeys, fingerprint
from fedsim.flower.protocol import TrainInstruction
from fedsim.flower.records import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, ParamLayout, RecordError
from fedsim.strategy import ParticipationLimit
from fedsim.types import CohortChunk
from fedsim.validation import is_int

__all__ = ["PRIVATE_FLOWER_COUNTS", "ROSTER_COUNTS", "WITHHELD", "FlowerGridExecutor", "SentRound"]

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
