"""Property tests of server-side update validation: whatever junk the clients report, every row is
either accepted or counted under exactly one rejection reason, nothing raises, and the accepted
sum is exactly the sum of the valid rows.

Rows are generated *with* their expected fate (valid, or one specific defect), so the test does
not re-implement the validator: it checks the validator against how the inputs were built.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsim.engine.aggregation import REJECTION_REASONS, UpdateAccumulator
from fedsim.population import ParticipationLedger
from fedsim.strategy import ParticipationLimit
from fedsim.types import CohortChunk

P = 5  # parameters
N = 40  # devices
ROUND = 7
MAX_NORM = 10.0
EXHAUSTED = (30, 31, 32, 33)  # devices that already used their one participation

KINDS = ("valid", "nan", "inf", "medium", "huge", "negative_count", "fraction_count", "nan_count",
         "unknown", "stale", "duplicate", "limited")


@dataclass
class Row:
    kind: str
    device: object
    delta: list[float]
    count: object
    round: int


@st.composite
def _row(draw: st.DrawFn, kind: str) -> Row:
    base = draw(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=P, max_size=P))
    norm = float(np.linalg.norm(base))
    if norm > 1.0:  # valid rows respect the clip bound C = 1
        base = [v / norm for v in base]
    count: object = draw(st.integers(0, 200))
    device: object = None
    rnd = ROUND
    delta = list(base)
    if kind == "nan":
        delta[draw(st.integers(0, P - 1))] = float("nan")
    elif kind == "inf":
        delta[draw(st.integers(0, P - 1))] = draw(st.sampled_from([float("inf"), float("-inf")]))
    elif kind == "medium":  # above C, below the engine's max-update-norm
        delta = [0.0] * P
        delta[0] = draw(st.floats(1.5, 9.0))
    elif kind == "huge":  # above max-update-norm, up to float32 overflow territory
        delta = [draw(st.floats(MAX_NORM * 1.5, 2.0**127, width=32)) for _ in range(P)]
    elif kind == "negative_count":
        count = draw(st.integers(-(2**40), -1))
    elif kind == "fraction_count":
        count = draw(st.floats(0.1, 1e6).filter(lambda v: v != int(v)))
    elif kind == "nan_count":
        count = draw(st.sampled_from([float("nan"), float("inf")]))
    elif kind == "unknown":
        device = draw(st.one_of(st.integers(N, 2**62), st.integers(-(2**62), -1)))
    elif kind == "stale":
        rnd = draw(st.sampled_from([0, ROUND - 1, ROUND + 1, 10**6]))
    elif kind == "limited":
        device = draw(st.sampled_from(EXHAUSTED))
    return Row(kind, device, delta, count, rnd)


def _expected(kind: str, clip: float | None) -> str:
    return {
        "valid": "",
        "nan": "non_finite",
        "inf": "non_finite",
        "medium": "norm_exceeds_clip" if clip is not None else "",
        "huge": "norm_exceeds_clip" if clip is not None else "norm_exceeds_max",
        "negative_count": "bad_example_count",
        "fraction_count": "bad_example_count",
        "nan_count": "bad_example_count",
        "unknown": "unknown_device",
        "stale": "stale_round",
        "duplicate": "duplicate_device",
        "limited": "participation_limit",
    }[kind]


@st.composite
def _round_reports(draw: st.DrawFn) -> tuple[list[list[Row]], float | None, str]:
    clip = draw(st.sampled_from([None, 1.0]))
    weighting = draw(st.sampled_from(["examples", "uniform"]))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=0, max_size=24))
    pool = list(draw(st.permutations([d for d in range(N) if d not in EXHAUSTED])))
    used: list[int] = []  # ids of accepted rows so far (what a duplicate repeats)
    rows: list[Row] = []
    for kind in kinds:
        if kind == "duplicate" and not used:
            kind = "valid"
        row = draw(_row(kind))
        if kind == "duplicate":
            row.device = draw(st.sampled_from(used))
        elif row.device is None:
            row.device = pool.pop()
            if _expected(kind, clip) == "":
                used.append(row.device)
        rows.append(row)
    # split into chunks at random points
    cuts = sorted(draw(st.lists(st.integers(0, len(rows)), max_size=3)))
    chunks, start = [], 0
    for c in [*cuts, len(rows)]:
        chunks.append(rows[start:c])
        start = c
    return chunks, clip, weighting


def _accumulator(clip: float | None, weighting: str) -> UpdateAccumulator:
    ledger = ParticipationLedger(N, ParticipationLimit(max_participations=1))
    ledger.record(2, np.array(EXHAUSTED))
    return UpdateAccumulator(
        num_params=P, round=ROUND, clip_norm=clip, weighting=weighting, ledger=ledger, num_devices=N,
        max_norm=MAX_NORM,
    )


def _chunk(rows: list[Row], losses: object) -> CohortChunk:
    counts = [r.count for r in rows]
    as_int = all(isinstance(c, int) for c in counts)
    return CohortChunk(
        device_ids=np.array([r.device for r in rows], dtype=np.int64),
        deltas=torch.tensor([r.delta for r in rows], dtype=torch.float32).reshape(len(rows), P),
        num_examples=np.array(counts, dtype=np.int64 if as_int else np.float64),
        losses=losses,  # type: ignore[arg-type]
        rounds=np.array([r.round for r in rows], dtype=np.int64),
    )


_losses = st.one_of(
    st.none(),
    st.just("junk"),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=30).map(lambda v: np.array(v, dtype=np.float64)),
    st.integers(0, 30).map(lambda n: torch.full((n,), float("nan"))),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_round_reports(), st.data())
def test_any_mix_of_junk_rows_is_counted_and_the_sum_is_the_valid_rows(
    reports: tuple[list[list[Row]], float | None, str], data: st.DataObject
) -> None:
    chunks, clip, weighting = reports
    acc = _accumulator(clip, weighting)
    expected_sum = np.zeros(P, dtype=np.float64)
    expected_reasons: Counter[str] = Counter()
    valid_ids, valid_examples, total = [], 0, 0
    for rows in chunks:
        losses = data.draw(_losses)
        mask = acc.add(_chunk(rows, losses))
        want = [_expected(r.kind, clip) for r in rows]
        assert mask.tolist() == [w == "" for w in want], [r.kind for r in rows]
        for r, w in zip(rows, want, strict=True):
            total += 1
            if w:
                expected_reasons[w] += 1
            else:
                weight = float(r.count) if weighting == "examples" else 1.0
                expected_sum += weight * np.asarray(r.delta, dtype=np.float64)
                valid_ids.append(r.device)
                valid_examples += int(r.count)
    batch = acc.result()
    assert batch.rejected == dict(expected_reasons)
    assert set(batch.rejected) <= set(REJECTION_REASONS)
    assert batch.num_updates + batch.num_rejected == total
    assert batch.num_updates == len(valid_ids) and batch.num_examples == valid_examples
    assert acc.accepted.tolist() == valid_ids
    assert torch.isfinite(batch.delta_sum).all()
    scale = 1.0 + np.abs(expected_sum).max(initial=0.0)
    assert np.allclose(batch.delta_sum.double().numpy(), expected_sum, rtol=1e-5, atol=1e-5 * scale)
    loss = acc.mean_loss
    assert loss is None or np.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# malformed chunk structure: every row is counted under one reason, nothing raises


def _junk_chunks() -> st.SearchStrategy[tuple[CohortChunk, int, str]]:
    def make(m: int, how: str, seed: int) -> tuple[CohortChunk, int, str]:
        g = torch.Generator().manual_seed(seed)
        rows = torch.rand(m, P, generator=g) * 0.1
        ids = np.arange(m)
        counts: object = np.ones(m, dtype=np.int64)
        deltas: object = rows
        rounds: object = np.full(m, ROUND)
        reason = {"float64": "wrong_dtype", "int": "wrong_dtype", "sparse": "wrong_dtype"}.get(how, "wrong_shape")
        if how == "float64":
            deltas = rows.double()
        elif how == "int":
            deltas = (rows * 100).to(torch.int32)
        elif how == "sparse":
            deltas = rows.to_sparse()
        elif how == "columns":
            deltas = torch.rand(m, P + 1, generator=g)
        elif how == "flat":
            deltas = rows.reshape(-1)
        elif how == "cube":
            deltas = rows.reshape(m, P, 1)
        elif how == "numpy":
            deltas = rows.numpy()
        elif how == "list":
            deltas = rows.tolist()
        elif how == "none":
            deltas = None
        elif how == "ids_short":
            ids = ids[:-1]
        elif how == "ids_long":
            ids = np.arange(m + 1)
        elif how == "ids_ragged":
            ids = [[0, 1], [2]]
            reason = "wrong_shape"
        elif how == "ids_strings":
            ids = np.array([f"dev{i}" for i in range(m)])
            reason = "unknown_device"
        elif how == "ids_float":
            ids = np.arange(m) + 0.5
            reason = "unknown_device"
        elif how == "ids_bool":
            ids = np.ones(m, dtype=bool)
            reason = "unknown_device"
        elif how == "counts_strings":
            counts = ["many"] * m
            reason = "bad_example_count"
        elif how == "counts_short":
            counts = np.ones(max(0, m - 1), dtype=np.int64)
            reason = "bad_example_count"
        elif how == "counts_none":
            counts = None
            reason = "bad_example_count"
        elif how == "counts_huge":
            counts = np.full(m, 2**62, dtype=np.int64)
            reason = "bad_example_count"
        elif how == "rounds_short":
            rounds = np.full(max(0, m - 1), ROUND)
            reason = "stale_round"
        elif how == "rounds_strings":
            rounds = ["now"] * m
            reason = "stale_round"
        chunk = CohortChunk(device_ids=ids, deltas=deltas, num_examples=counts, losses=None, rounds=rounds)  # type: ignore[arg-type]
        expected_rows = m
        if how == "ids_short":
            expected_rows = m - 1
        elif how == "ids_long":
            expected_rows = m + 1
        elif how == "ids_ragged":
            expected_rows = m
        return chunk, expected_rows, reason

    hows = ["float64", "int", "sparse", "columns", "flat", "cube", "numpy", "list", "none", "ids_short",
            "ids_long", "ids_ragged", "ids_strings", "ids_float", "ids_bool", "counts_strings",
            "counts_short", "counts_none", "counts_huge", "rounds_short", "rounds_strings"]
    return st.builds(make, st.integers(2, 9), st.sampled_from(hows), st.integers(0, 2**31))


@settings(max_examples=200, deadline=None)
@given(_junk_chunks())
def test_malformed_chunks_are_rejected_whole_and_counted(case: tuple[CohortChunk, int, str]) -> None:
    chunk, rows, reason = case
    acc = _accumulator(None, "examples")
    mask = acc.add(chunk)
    assert not mask.any()
    batch = acc.result()
    assert batch.num_updates == 0 and torch.equal(batch.delta_sum, torch.zeros(P))
    if isinstance(chunk.device_ids, list):  # ragged ids: not array-like, rows taken from deltas
        rows = chunk.deltas.shape[0]
    assert batch.rejected == {reason: rows}
    assert len(mask) == rows
