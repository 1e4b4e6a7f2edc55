"""Secure aggregation on Flower: a round's cohort summed by Flower's SecAgg+, the server sees the sum.

With ``[flower] secure-aggregation = true`` every round's client work runs under Flower's own
SecAgg+ implementation (``flwr.server.workflow.SecAggPlusWorkflow`` on the server,
``flwr.client.mod.secaggplus_mod`` on the devices); nothing here is a protocol of fedsim's own.
How it composes with the bridge (docs/flower.md, "Secure aggregation"):

* the workflow is a *legacy* workflow: it takes a ``LegacyContext`` whose (legacy) strategy
  ``configure_fit`` names the cohort and whose ``aggregate_fit`` receives the result. The bridge
  stays a Message-API strategy: :class:`SecAggGridExecutor` runs the workflow inside the round,
  over the ServerApp's grid, with :class:`_CohortStrategy` as that legacy strategy (it hands the
  workflow the round's train instructions and keeps what it receives). Flower's own round loop
  (``Strategy.start``) then has nothing left to send;
* the four SecAgg+ stages are four ``train`` messages to every device of the cohort; the
  ClientApp's ``train`` handler carries :func:`secure_aggregation_mod`, which hands a message that
  carries SecAgg+'s configs to ``secaggplus_mod`` (the others, a clear deployment's, go straight to
  the handler). In the masked-vector stage ``secaggplus_mod`` calls the handler, which trains,
  clips and replies in the legacy ``FitRes`` layout; the mod quantises, masks and replaces the
  update by its masked vector before the reply leaves the device;
* the server learns the cohort's sum and, in the clear, who took part (each reply's device id,
  round, and whether the device declined the round under its participation limit): a device that
  declines still takes part in the protocol, with weight 0 and a zero vector.

Accounting (docs/threat-model.md):

* the device clips its update to ``C - margin``, ``margin = (2 r / Q) sqrt(d)`` (``r``: the
  clipping range, ``Q``: the quantisation range, ``d``: the number of parameters), so that its
  quantised update, whose stochastic rounding moves every coordinate by less than one step
  ``2 r / Q``, still has norm at most ``C``: the sensitivity the strategy's noise is calibrated to;
* coordinates are clipped to ``[-r, r]`` (``r`` defaults to ``C``: a coordinate of a clipped update
  never exceeds it), which never raises a norm;
* an honest cohort's sum of quantised entries, at most ``cohort * Q``, stays below the modulus
  ``M`` (checked when the scenario is loaded, and for every round's actual cohort), so the sum
  never wraps around; a device that deviates from the protocol is bounded only by the modulus;
* a round whose protocol does not complete (too few devices left to reconstruct the masks: a
  SecAgg+ failure) adds nothing: the round is ended once, with the strategy's noise on an empty
  sum, and its privacy event is recorded once, as for a round whose replies never came. Its
  devices are remembered as asked (they may have trained), so they are not asked again sooner
  than their limit allows. Nothing of a round is ever released twice.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.engine.rounds import RoundPlan
from fedsim.errors import ScenarioError
from fedsim.flower.executor import FlowerGridExecutor, SentRound
from fedsim.flower.records import CONFIG_KEY
from fedsim.flower.traffic import Traffic
from fedsim.scenario import FlowerConfig

logger = logging.getLogger("flwr.fedsim")

#: the legacy ``FitIns`` records a SecAgg+ round's masked-vector stage carries to the device
FITINS_CONFIG = "fitins.config"
FITINS_PARAMETERS = "fitins.parameters"
#: relative slack on the quantisation margin (float64 rounding of the quantiser's arithmetic)
MARGIN_SLACK = 1e-6


def quantisation_margin(clipping_range: float, quantization_range: int, num_params: int) -> float:
    """How far stochastic rounding can move an update (L2): ``(2 r / Q) sqrt(d)``, plus a relative slack.

    Flower's quantiser maps a coordinate ``x`` in ``[-r, r]`` to ``(x + r) Q / (2 r)`` and rounds
    it stochastically to one of its two neighbouring integers: a change of less than one step
    ``2 r / Q`` per coordinate once dequantised, so less than ``(2 r / Q) sqrt(d)`` in L2.
    """
    step = 2.0 * float(clipping_range) / int(quantization_range)
    return step * math.sqrt(num_params) * (1.0 + MARGIN_SLACK)


def check_quantisation(settings: FlowerConfig, clip: float | None, num_params: int) -> None:
    """Refuse (one line) a quantisation too coarse for the model: the margin must be below ``C``.

    ``clip``: the strategy's clip bound, ``None`` when it has none (then ``secagg-clipping-range``
    must be set: it is the only bound on a coordinate).
    """
    r = settings.secagg_clipping_range if settings.secagg_clipping_range is not None else clip
    if r is None:
        raise ScenarioError(
            "the strategy has no clip bound: set secagg-clipping-range (coordinates are clipped to it before quantisation)",
            key="flower.secagg-clipping-range",
        )
    if clip is None:
        return
    margin = quantisation_margin(r, settings.secagg_quantization_range, num_params)
    if margin >= clip:
        raise ScenarioError(
            f"the quantisation step moves an update by up to {margin:.4g} (L2, {num_params} parameters), not below "
            f"the clip bound {clip:g}: raise secagg-quantization-range (2 r sqrt(d) / Q must be < C)",
            key="flower.secagg-quantization-range",
        )


@dataclass(frozen=True)
class SecAggRound:
    """One round's SecAgg+ parameters, resolved for its cohort (Flower's ``SecAggPlusWorkflow`` arguments)."""

    cohort: int
    shares: int
    threshold: int
    clipping_range: float
    quantization_range: int
    modulus: int

    @classmethod
    def resolve(cls, settings: FlowerConfig, cohort: int, clip: float | None) -> SecAggRound | str:
        """The round's parameters, or why the round cannot run under SecAgg+ (a one-line reason).

        ``secagg-shares`` 0 is the whole cohort; an even share count below the cohort becomes the
        next odd one (as SecAgg+ builds its neighbour ring); ``secagg-threshold`` 0 is a majority
        of the shares, at least 2.
        """
        if cohort < 2:
            return f"a cohort of {cohort} device(s): SecAgg+ needs at least 2 (the sum of one update is the update)"
        shares = cohort if settings.secagg_shares == 0 else min(settings.secagg_shares, cohort)
        if shares < cohort and shares % 2 == 0:
            shares += 1
        threshold = settings.secagg_threshold or max(2, shares // 2 + 1)
        if threshold > shares or (shares < cohort and threshold >= shares):
            return f"secagg-threshold {threshold} is above what a cohort of {cohort} can reconstruct ({shares} shares)"
        q, m = settings.secagg_quantization_range, settings.secagg_modulus
        if cohort * q >= m:
            return f"a cohort of {cohort} x secagg-quantization-range {q} would wrap around secagg-modulus {m}"
        r = settings.secagg_clipping_range if settings.secagg_clipping_range is not None else clip
        if r is None:
            return "the round has no clip bound and [flower] secagg-clipping-range is not set"
        return cls(cohort, shares, threshold, float(r), q, m)

    def workflow(self, timeout: float | None) -> SecAggPlusWorkflow:
        """Flower's SecAgg+ workflow with these parameters (every device weighs 1: ``max_weight`` 1)."""
        # Flower reads a float share count as a fraction of the cohort (1.0: every member) and an
        # integer as a count (> 2)
        shares: int | float = 1.0 if self.shares == self.cohort else self.shares
        return SecAggPlusWorkflow(
            shares,
            self.threshold,
            max_weight=1.0,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus,
            timeout=timeout,
        )


class _CohortStrategy(LegacyStrategy):
    """The legacy strategy the SecAgg+ workflow asks: the round's cohort in, the result out.

    ``configure_fit`` returns one ``FitIns`` per device of the round (the global model and the
    device's train instruction); ``aggregate_fit`` keeps the results (each one's ``FitRes`` carries
    the device's clear metrics and, put there by the workflow, the dequantised aggregate) and
    changes nothing on the server: the bridge ends the round.
    """

    def __init__(self, grid: Grid, instructions: dict[int, ConfigRecord], parameters: Parameters) -> None:
        self.grid = grid
        self.instructions = instructions
        self.parameters = parameters
        #: ``(node id, FitRes)`` of the devices whose masked vectors were summed; ``None`` until
        #: the workflow completes (it never calls ``aggregate_fit`` when it halts)
        self.results: list[tuple[int, FitRes]] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [
            (GridClientProxy(node, self.grid, 0), FitIns(self.parameters, dict(config)))
            for node, config in self.instructions.items()
        ]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Any]]:
        self.results = [(int(proxy.node_id), res) for proxy, res in results]
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _CountingGrid:
    """The ServerApp's grid, counting the bytes and arrays of what the SecAgg+ workflow exchanges."""

    def __init__(self, grid: Grid, traffic: Traffic) -> None:
        self.grid = grid
        self.traffic = traffic
        #: array entries found in the replies (SecAgg+ replies carry none: masked vectors are bytes)
        self.arrays_received = 0
        #: nodes that were sent a stage's message and did not answer it (or answered with an error)
        self.failed: set[int] = set()

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.traffic.sent(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.traffic.received(replies)
        answered = set()
        for reply in replies:
            if not reply.has_error():
                answered.add(int(reply.metadata.src_node_id))
                self.arrays_received += sum(len(rec) for rec in reply.content.array_records.values())
        self.failed |= {int(m.metadata.dst_node_id) for m in messages} - answered
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


class _WorkflowLogFilter(logging.Filter):
    """Keeps the SecAgg+ workflow's own log lines of a DP run out of the log.

    Flower's workflow logs whether a round's protocol completed or halted ("Insufficient available
    nodes.", "Secure aggregation halted.") and how many devices answered each stage: facts about
    individual devices' failures, which a DP run withholds (``docs/threat-model.md``). In a DP run
    they go to the private record instead (``private/flower-events.jsonl``); otherwise they pass.
    """

    def __init__(self, executor: FlowerGridExecutor, server_round: int) -> None:
        super().__init__()
        self.executor = executor
        self.server_round = server_round

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.executor.private or "/secure_aggregation/" not in record.pathname.replace("\\", "/"):
            return True
        if record.levelno > logging.DEBUG:
            self.executor.private_events.append(
                {"round": self.server_round, "event": "secagg_log", "device": None, "node": None, "message": record.getMessage()}
            )
        return False


@dataclass
class SecAggOutcome:
    """What one round's SecAgg+ run gave the server."""

    #: node id -> device id of the devices the round's messages went to
    devices: dict[int, int]
    #: the workflow's results (``None``: it halted, or the round could not run under SecAgg+)
    results: list[tuple[int, FitRes]] | None
    #: why nothing was summed, when ``results`` is ``None``
    reason: str = ""
    params: SecAggRound | None = None
    arrays_received: int = 0
    #: nodes that missed a stage (no reply in time, or an error)
    failed: set[int] = field(default_factory=set)
    seconds: float = 0.0


class SecAggGridExecutor(FlowerGridExecutor):
    """:class:`~fedsim.flower.executor.FlowerGridExecutor` whose rounds run under Flower's SecAgg+.

    :meth:`messages` runs the whole protocol over :attr:`grid` (four stages, every one a ``train``
    message to each device of the cohort) and returns no message for Flower's own loop to send;
    :meth:`collect` folds the secure sum into the round's accumulator
    (:meth:`~fedsim.engine.aggregation.UpdateAccumulator.add_secure_sum`). Counts: ``declined``
    (a device's clear reply says so), ``secagg_failed`` (rounds whose protocol did not complete,
    their devices' events in the private record in a DP run), ``secagg_rounds`` (rounds summed),
    ``secagg_arrays_received`` (array entries in any reply: 0 unless a device sent one in the clear).
    """

    def __init__(self, *, settings: FlowerConfig, traffic: Traffic | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.traffic = traffic if traffic is not None else Traffic()
        self.outcome: SecAggOutcome | None = None

    def messages(self, plan: RoundPlan, *, server_round: int) -> SentRound:
        """Run the round's SecAgg+ protocol with the selected devices; nothing is left to send."""
        sent = super().messages(plan, server_round=server_round)
        self.outcome = self.run_protocol(plan, sent, server_round)
        return SentRound(plan, [], sent.devices)

    def run_protocol(self, plan: RoundPlan, sent: SentRound, server_round: int) -> SecAggOutcome:
        """Flower's SecAgg+ workflow over the grid, with the round's train instructions."""
        devices = {int(m.metadata.dst_node_id): dev for m, dev in zip(sent.messages, sent.devices, strict=True)}
        resolved = SecAggRound.resolve(self.settings, len(sent.messages), plan.config.clip_norm)
        if isinstance(resolved, str):
            return SecAggOutcome(devices, None, reason=resolved)
        check_quantisation(self.settings, plan.config.clip_norm, self.layout.num_params)  # the round's own bound
        if self.grid is None:
            raise RuntimeError("SecAggGridExecutor needs a grid")
        global_arrays = self.layout.to_arrays(plan.params)
        parameters = ndarrays_to_parameters(global_arrays.to_numpy_ndarrays())
        instructions = {node: m.content.config_records[CONFIG_KEY] for node, m in zip(devices, sent.messages, strict=True)}
        legacy = _CohortStrategy(self.grid, instructions, parameters)
        state = RecordDict(
            {
                MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                MAIN_PARAMS_RECORD: global_arrays,
            }
        )
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}), strategy=legacy)
        grid = _CountingGrid(self.grid, self.traffic)
        self.traffic.device_rounds += len(devices)
        start = time.perf_counter()
        flwr_logger = logging.getLogger("flwr")
        withheld = _WorkflowLogFilter(self, server_round)
        flwr_logger.addFilter(withheld)
        try:
            resolved.workflow(self.round_timeout)(grid, context)  # type: ignore[arg-type]
        finally:
            flwr_logger.removeFilter(withheld)
        seconds = time.perf_counter() - start
        self.events["secagg_arrays_received"] += grid.arrays_received
        reason = "" if legacy.results is not None else "SecAgg+ halted: too few devices left to reconstruct the masks"
        return SecAggOutcome(
            devices, legacy.results, reason=reason, params=resolved, arrays_received=grid.arrays_received,
            failed=grid.failed, seconds=seconds,
        )

    def collect(self, sent_round: SentRound, replies: Any, acc: UpdateAccumulator) -> np.ndarray:
        """Fold the round's secure sum into ``acc``; the devices asked (less those that declined)."""
        server_round = sent_round.plan.round + 1
        self.next_round = server_round + 1
        outcome, self.outcome = self.outcome, None
        for _ in replies:  # Flower's loop sent nothing: anything here answers no message of this round
            self.events["unexpected_reply"] += 1
        if outcome is None or not outcome.devices:
            return np.asarray(sent_round.devices, dtype=np.int64)
        for node in sorted(outcome.failed):
            # a node that missed a stage leaves the roster and is asked to check in again (as a
            # node that misses a clear round's reply); in a DP run that is withheld
            dev = outcome.devices.get(node)
            self.events["no_reply"] += 1
            self.device_event(
                "no_reply", server_round, dev, node,
                "fedsim: round %d: device %d (node %d) missed a SecAgg+ stage (no reply in time, or an error)",
                server_round, dev, node,
            )
            self.drop(node)
        if outcome.results is None:
            self.events["secagg_failed"] += 1
            self.device_event(
                "secagg_failed", server_round, None, None,
                "fedsim: round %d: nothing summed: %s", server_round, outcome.reason,
            )
            return np.asarray(sent_round.devices, dtype=np.int64)
        self.events["secagg_rounds"] += 1
        declined: list[int] = []
        summed: list[int] = []
        mean: np.ndarray | None = None
        for node, res in outcome.results:
            dev = outcome.devices.get(node)
            claimed = res.metrics.get("device-id")
            if dev is None or claimed != dev:
                # a reply cannot be taken out of the sum: the whole sum is refused
                acc.rejected["device_mismatch"] += len(outcome.results)
                self.device_event(
                    "device_mismatch", server_round, dev, node,
                    "fedsim: round %d: node %d answered as device %r: the round's sum is refused", server_round, node, claimed,
                )
                return np.asarray(sent_round.devices, dtype=np.int64)
            if res.metrics.get("declined") == 1:
                declined.append(dev)
                self.events["declined"] += 1
                self.device_event(
                    "declined", server_round, dev, node,
                    "fedsim: round %d: device %d (node %d) declined: its participation ledger forbids the round", server_round, dev, node,
                )
            else:
                summed.append(dev)
            if mean is None:
                mean = np.concatenate([a.reshape(-1) for a in parameters_to_ndarrays(res.parameters)]).astype(np.float64)
        if summed and mean is not None:
            if mean.shape != (self.layout.num_params,):
                acc.rejected["wrong_shape"] += len(summed)
            else:
                # SecAgg+ returns the weighted mean (every summed device weighs 1): the sum is
                # that times the number of devices that did not decline
                total = torch.from_numpy(mean * len(summed)).to(torch.float32)
                acc.add_secure_sum(np.asarray(sorted(summed), dtype=np.int64), total)
        return np.asarray([d for d in sent_round.devices if d not in declined], dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# the device's side


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: a ``train`` message of a SecAgg+ round goes through Flower's ``secaggplus_mod``.

    A message that carries SecAgg+'s config record is one of the protocol's four stages; any other
    message (a clear deployment's ``train``) goes straight to the handler.
    """
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure(msg: Message) -> bool:
    """Whether a ``train`` message is SecAgg+'s masked-vector stage (legacy ``FitIns`` records)."""
    return FITINS_CONFIG in msg.content.config_records


def secure_instruction(msg: Message) -> tuple[ConfigRecord, list[np.ndarray]]:
    """The train instruction and the global model's arrays (in the model's order) of a SecAgg+ round."""
    config = msg.content.config_records[FITINS_CONFIG]
    parameters = compat.arrayrecord_to_parameters(msg.content.array_records[FITINS_PARAMETERS], keep_input=True)
    return config, parameters_to_ndarrays(parameters)


def secure_clip_bound(clip: float | None, context: Context, num_params: int) -> float | None:
    """The bound a device clips its update to under SecAgg+: ``C - margin`` (module docstring).

    The clipping and quantisation ranges come from the device's own SecAgg+ state (the setup
    stage's configuration). ``None``: the round has no clip bound.
    """
    if clip is None:
        return None
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if state is None or "clipping_range" not in state or "target_range" not in state:
        raise ValueError("a SecAgg+ train message arrived before the SecAgg+ setup stage")
    margin = quantisation_margin(float(state["clipping_range"]), int(state["target_range"]), num_params)
    if margin >= clip:
        raise ValueError(f"the quantisation margin {margin:.4g} is not below the clip bound {clip:g}")
    return clip - margin


def clip_to(delta: torch.Tensor, bound: float) -> np.ndarray:
    """``delta`` scaled (float64) so that its L2 norm is at most ``bound``."""
    flat = delta.detach().to(torch.float64).cpu().numpy()
    norm = float(np.linalg.norm(flat))
    if norm > bound:
        flat = flat * (bound / norm) * (1.0 - 1e-12)
    return flat


def secure_reply(
    msg: Message, *, device: int, round_: int, arrays: list[np.ndarray] | None
) -> Message:
    """The masked-vector stage's reply in the legacy ``FitRes`` layout ``secaggplus_mod`` reads.

    ``arrays``: the clipped update (float64, so that the quantiser works in float64); ``None``:
    the device declines the round and takes part with weight 0 (a zero vector). Its clear metrics
    are the device id, the round and whether it declined: no loss, no example count.
    """
    declined = arrays is None
    if declined:
        shapes = [a.shape for a in secure_instruction(msg)[1]]
        arrays = [np.zeros(s, dtype=np.float64) for s in shapes]
    res = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=0 if declined else 1,
        metrics={"device-id": device, "round": round_, "declined": int(declined)},
    )
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def split_like(flat: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """A flat vector cut into arrays of ``shapes`` (the model's order)."""
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(np.ascontiguousarray(flat[start : start + size].reshape(shape)))
        start += size
    return out


__all__ = [
    "SecAggGridExecutor",
    "SecAggRound",
    "check_quantisation",
    "clip_to",
    "is_secure",
    "quantisation_margin",
    "secure_aggregation_mod",
    "secure_clip_bound",
    "secure_instruction",
    "secure_reply",
    "split_like",
]
