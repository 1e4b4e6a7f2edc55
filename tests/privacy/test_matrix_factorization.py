"""Matrix-factorization DP-FTRL (BLT, banded): algebra, exact sensitivity, optimiser, noise streams;
its accounting and planning (events, rho, calibration, the ``fedsim privacy`` command line); and the
mechanisms "blt" and "banded" (releases, events, state, a real run).

References are independent of the code under test: dense matrices and ``numpy.linalg.inv`` for
the Toeplitz algebra, enumeration of every participation pattern for the sensitivity, and the
values measured with jax_privacy 2.0.0 at the Gboard parameters (FIELD-NOTES: 3-buffer BLT
product 117, banded 314 bands 110).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim import privacy_cli
from fedsim.privacy import matrix_factorization as mf
from fedsim.privacy.accountant import Accountant, mf_privacy, mf_sensitivity_sq
from fedsim.privacy.calibration import calibrate_mf_noise_multiplier
from fedsim.privacy.conversions import epsilon_from_rho
from fedsim.privacy.events import (
    MatrixFactorizationEvent,
    PrivacyLedger,
    TreeAggregationEvent,
    event_from_dict,
    event_to_dict,
)
from fedsim.privacy.mechanisms import (
    MECHANISMS,
    BandedMechanism,
    BLTMechanism,
    Mechanism,
    build_mechanism,
)
from fedsim.privacy.noise import NoiseKey, NoiseSource
from strategies.dp_ftrl import DPFTRL

from ..conftest import SCENARIOS, run_cli


def _source(key: int = 7) -> NoiseSource:
    return NoiseSource(NoiseKey.from_seed(key))


def _random_blt(rng: np.random.Generator, nb: int) -> mf.BLT:
    d = np.sort(rng.uniform(0.05, 0.99, nb))[::-1]
    s = rng.dirichlet(np.ones(nb)) * rng.uniform(0.1, 0.95)
    return mf.BLT(tuple(d), tuple(s))


# -- algebra ----------------------------------------------------------------------------------------
def test_blt_coefficients_and_inverse_match_dense_matrices():
    rng = np.random.default_rng(0)
    for nb in (1, 2, 4):
        blt = _random_blt(rng, nb)
        n = 17
        c = blt.coefs(n)
        d, s = np.array(blt.decays), np.array(blt.scales)
        expected = [1.0] + [float((s * d ** (k - 1)).sum()) for k in range(1, n)]
        np.testing.assert_allclose(c, expected, rtol=1e-13)
        dense_inv = np.linalg.inv(mf.toeplitz_matrix(c, n))
        np.testing.assert_allclose(blt.inverse_coefs(n), dense_inv[:, 0], atol=1e-12)
        np.testing.assert_allclose(mf.inverse_coefs(c, n), dense_inv[:, 0], atol=1e-12)
        # the inverse is a BLT again (negative scales), and inverting twice gives C back
        inv = blt.inverse()
        np.testing.assert_allclose(inv.coefs(n), dense_inv[:, 0], atol=1e-12)
        assert all(v < 0 for v in inv.scales)
        np.testing.assert_allclose(mf.inverse_coefs(inv.coefs(n), n), c, atol=1e-11)


def test_prefix_variances_are_row_norms_of_b():
    blt = _random_blt(np.random.default_rng(1), 3)
    n = 12
    c_inv = np.linalg.inv(mf.toeplitz_matrix(blt.coefs(n), n))
    b = np.tril(np.ones((n, n))) @ c_inv
    np.testing.assert_allclose(mf.prefix_variances(blt.inverse_coefs(n)), (b * b).sum(axis=1),
                               rtol=1e-12)
    # identity strategy: independent noise per round, the prefix at t sums t + 1 of them
    np.testing.assert_allclose(mf.prefix_variances(np.eye(1, n)[0]), np.arange(1, n + 1))


def test_toeplitz_gram_matches_dense():
    c = np.random.default_rng(2).normal(size=9)
    mat = mf.toeplitz_matrix(c, 9)
    np.testing.assert_allclose(mf.toeplitz_gram(c), mat.T @ mat, atol=1e-12)


# -- sensitivity ------------------------------------------------------------------------------------
def _every_pattern(n, k, sep):
    for size in range(1, k + 1):
        for pts in itertools.combinations(range(n), size):
            if all(b - a >= sep for a, b in zip(pts, pts[1:], strict=False)):
                yield pts


def test_brute_force_enumerates_every_pattern():
    mat = mf.toeplitz_matrix(np.random.default_rng(3).uniform(0, 1, 8), 8)
    for k, b in ((1, 0), (2, 1), (3, 2), (8, 0)):
        ref = max(float(mat[:, list(p)].sum(axis=1) @ mat[:, list(p)].sum(axis=1))
                  for p in _every_pattern(8, k, b + 1))
        assert mf.brute_force_sensitivity_sq(mat, k, b) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("n,k,b", [(6, 2, 1), (9, 3, 2), (10, 2, 4), (12, 4, 1), (11, 11, 0),
                                   (12, 3, 5), (7, 5, 1)])
def test_blt_sensitivity_is_exact_against_brute_force(n, k, b):
    rng = np.random.default_rng(n * 100 + k * 10 + b)
    for nb in (1, 3):
        blt = _random_blt(rng, nb)
        c = blt.coefs(n)
        assert np.all(np.diff(c) <= 0) and np.all(c >= 0)
        got = mf.toeplitz_sensitivity_sq(c, n, k, b)
        assert got.exact
        ref = mf.brute_force_sensitivity_sq(mf.toeplitz_matrix(c, n), k, b)
        assert got.value == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("n,k,b,bands", [(10, 3, 2, 3), (12, 2, 5, 6), (9, 9, 0, 1), (11, 4, 1, 2)])
def test_banded_sensitivity_is_exact_for_any_signs(n, k, b, bands):
    rng = np.random.default_rng(bands * 7 + n)
    coefs = np.concatenate([[1.0], rng.normal(size=bands - 1)])
    got = mf.toeplitz_sensitivity_sq(coefs, n, k, b)
    assert got.exact
    # columns of separated participations are disjoint: the sum of squared column norms
    ref = mf.brute_force_sensitivity_sq(mf.toeplitz_matrix(coefs, n), k, b)
    assert got.value == pytest.approx(ref, rel=1e-12)
    # the bound sqrt(k) x max column norm dominates it
    assert got.value <= mf.effective_participations(n, k, b) * float(coefs @ coefs) + 1e-12


def test_other_strategies_get_an_upper_bound():
    rng = np.random.default_rng(5)
    for _ in range(20):
        n, k, b = 10, int(rng.integers(2, 4)), int(rng.integers(0, 3))
        coefs = np.concatenate([[1.0], rng.uniform(0.0, 1.5, n - 1)])  # increasing somewhere
        got = mf.toeplitz_sensitivity_sq(coefs, n, k, b)
        assert not got.exact
        ref = mf.brute_force_sensitivity_sq(mf.toeplitz_matrix(coefs, n), k, b)
        assert got.value >= ref - 1e-9
    # a BLT whose scales sum above 1 has c_1 > c_0: only the bound applies
    blt = mf.BLT((0.9, 0.5), (0.8, 0.7))
    assert not mf.toeplitz_sensitivity_sq(blt.coefs(10), 10, 3, 1).exact
    # long horizons: the triangle-inequality bound, no T x T matrix
    n = mf.GRAM_LIMIT + 1
    big = mf.toeplitz_sensitivity_sq(blt.coefs(n), n, 3, 100)
    assert not big.exact and big.value == pytest.approx(9 * float(blt.coefs(n) @ blt.coefs(n)))
    assert big.value >= mf.toeplitz_sensitivity_sq(blt.coefs(n), 1000, 3, 100).value


def test_effective_participations():
    assert mf.effective_participations(2000, 6, 313) == 6
    assert mf.effective_participations(2000, 9, 313) == 7  # ceil(2000 / 314)
    assert mf.effective_participations(5, 9, 0) == 5


# -- optimiser --------------------------------------------------------------------------------------
def _product(strategy: mf.ToeplitzFactorization, n, k, b):
    sens = mf.toeplitz_sensitivity_sq(strategy.coefs(n), n, k, b).value
    return sens * float(strategy.prefix_variances(n).max())


def test_blt_optimiser_small_t_deterministic_and_better_than_the_square_root():
    n, k, b = 40, 3, 9
    first = mf.optimal_blt(n, k, b, num_buffers=2)
    mf.optimize_blt.cache_clear()
    again = mf.optimal_blt(n, k, b, num_buffers=2)
    assert first == again  # bit-identical, not only close
    blt = first.blt
    assert all(0 < d < 1 for d in blt.decays) and all(s > 0 for s in blt.scales)
    assert sum(blt.scales) < 1  # non-increasing coefficients: the exact sensitivity applies
    sqrt_a = mf.ToeplitzFactorization("banded", tuple(mf.banded_init_coefs(n)))  # A^(1/2), not banded
    sens_sqrt = mf.toeplitz_sensitivity_sq(sqrt_a.coefs(n), n, k, b).value
    assert _product(first, n, k, b) < sens_sqrt * float(sqrt_a.prefix_variances(n).max())
    # the identity (independent noise) and the prefix-sum matrix are far worse
    ident = mf.ToeplitzFactorization("banded", (1.0,))
    assert _product(first, n, k, b) < 0.5 * _product(ident, n, k, b)


def test_banded_optimiser_small_t():
    n, k, b = 30, 3, 6
    band = mf.optimal_banded(n, k, b)
    assert len(band.params) == b + 1 and band.params[0] == 1.0
    init = mf.ToeplitzFactorization("banded", tuple(mf.banded_init_coefs(b + 1)))
    assert _product(band, n, k, b) < _product(init, n, k, b)
    assert mf.optimal_banded(n, k, b, bands=3).params != band.params
    with pytest.raises(ValueError, match="bands must be <= min_separation"):
        mf.optimize_banded(n, k, b, bands=b + 2)


def test_long_optimisations_show_progress_on_stderr(monkeypatch, capsys):
    """A BLT for 50,000 rounds optimises for minutes: the iterations show on stderr once an
    optimisation has run PROGRESS_DELAY_S seconds (0 here, so that a small one shows it)."""
    from fedsim.privacy.matrix_factorization import optimization

    monkeypatch.setattr(optimization, "PROGRESS_DELAY_S", 0.0)
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    mf.optimize_blt.__wrapped__(40, 3, 9, 2)
    err = capsys.readouterr().err
    assert "optimising the BLT strategy for T=40 rounds (k=3, b=9)" in err and "iter" in err
    mf.optimize_banded.__wrapped__(30, 3, 6)
    err = capsys.readouterr().err
    assert "optimising the banded strategy for T=30 rounds (k=3, b=6, 7 bands)" in err
    # an optimisation shorter than the delay prints nothing (a delay no test run reaches)
    monkeypatch.setattr(optimization, "PROGRESS_DELAY_S", 1e9)
    mf.optimize_blt.__wrapped__(40, 3, 9, 2)
    assert capsys.readouterr().err == ""


def test_non_convergence_is_an_error():
    with pytest.raises(mf.OptimizationError, match="did not converge in 1 iterations"):
        mf.optimize_blt(50, 2, 9, 3, "max", 1)
    with pytest.raises(mf.OptimizationError, match="did not converge"):
        mf.optimize_banded(50, 2, 9, None, "max", 1)


def test_gboard_reference_values():
    # jax_privacy 2.0.0 at T=2000, k=6, min_sep=314: 3-buffer BLT 26.28 x 4.46 = 117 (decays
    # ~[1 - 1.2e-10, 0.9925, 0.7944], scales ~[0.00756, 0.1277, 0.3278]); banded 314 bands 110.
    n, k, b = 2000, 6, 313
    blt = mf.optimal_blt(n, k, b, num_buffers=3)
    sens = mf.toeplitz_sensitivity_sq(blt.coefs(n), n, k, b)
    err = float(blt.prefix_variances(n).max())
    assert sens.exact
    assert sens.value == pytest.approx(26.28, abs=0.05)
    assert err == pytest.approx(4.46, abs=0.02)
    assert sens.value * err <= 117.3
    np.testing.assert_allclose(blt.blt.decays[1:], [0.9925, 0.7944], atol=2e-4)
    np.testing.assert_allclose(blt.blt.scales, [0.00756, 0.1277, 0.3278], atol=2e-4)
    assert 1 - blt.blt.decays[0] < 1e-7  # not representable in float32
    assert np.float32(blt.blt.decays[0]) == 1.0
    band = mf.optimal_banded(n, k, b)
    assert len(band.params) == 314
    assert _product(band, n, k, b) <= 110.5


# -- noise streams ----------------------------------------------------------------------------------
def _dense_noise(coefs, source, tag, n, p, std):
    z = torch.stack([source.normal((tag, t), p) for t in range(n)]).double().numpy()
    return std * np.linalg.solve(mf.toeplitz_matrix(coefs, n), z)


def test_blt_noise_is_c_inverse_times_keyed_normals_and_resumes_bit_identically():
    source = _source()
    blt = mf.BLT((1 - 1e-10, 0.95, 0.5), (0.01, 0.2, 0.3))
    n, p, std = 25, 64, 1.7
    stream = mf.BLTNoise(blt, p, std, source)
    out = torch.stack([stream.step(t) for t in range(n)]).double().numpy()
    np.testing.assert_allclose(out, _dense_noise(blt.coefs(n), source, mf.TAG_BLT, n, p, std),
                               atol=1e-5)
    # resume after round 9 from the saved state: the same float32 bits
    first = mf.BLTNoise(blt, p, std, source)
    head = [first.step(t) for t in range(10)]
    saved = first.state_dict()
    tail = [first.step(t) for t in range(10, n)]
    second = mf.BLTNoise(blt, p, std, source)
    second.load_state_dict(saved)
    assert saved["buffers"].dtype == torch.float64
    for t, expected in zip(range(10, n), tail, strict=True):
        assert torch.equal(second.step(t), expected)
    assert torch.equal(torch.stack(head), torch.from_numpy(out[:10]).float())
    with pytest.raises(ValueError, match="expects round 25"):
        second.step(3)


def test_banded_noise_is_c_inverse_times_keyed_normals_and_resumes_bit_identically():
    source = _source()
    coefs = (1.0, 0.6, -0.2, 0.3)
    n, p, std = 20, 48, 0.8
    stream = mf.BandedNoise(coefs, p, std, source)
    out = torch.stack([stream.step(t) for t in range(n)]).double().numpy()
    np.testing.assert_allclose(out, _dense_noise(coefs, source, mf.TAG_BANDED, n, p, std),
                               atol=1e-5)
    first = mf.BandedNoise(coefs, p, std, source)
    for t in range(7):
        first.step(t)
    saved = first.state_dict()
    tail = [first.step(t) for t in range(7, n)]
    second = mf.BandedNoise(coefs, p, std, source)
    second.load_state_dict(saved)
    for t, expected in zip(range(7, n), tail, strict=True):
        assert torch.equal(second.step(t), expected)


def _prefix_variance_accepted(std_used: float, std_claimed: float) -> bool:
    """Do the empirical prefix variances of the BLT stream match the claimed std? (chi-square)."""
    blt = mf.BLT((0.99, 0.6), (0.15, 0.3))
    n, p = 12, 4000
    stream = mf.BLTNoise(blt, p, std_used, _source(11))
    prefix = torch.cumsum(torch.stack([stream.step(t) for t in range(n)]).double(), 0).numpy()
    predicted = std_claimed ** 2 * mf.prefix_variances(blt.inverse_coefs(n))
    # each round's p coordinates are i.i.d. N(0, var_t): sum (x / sd)^2 ~ chi2(p)
    stats = (prefix ** 2 / predicted[:, None]).sum(axis=1)
    z = (stats - p) / math.sqrt(2 * p)
    return bool(np.all(np.abs(z) < 4.5))


def test_statistical_noise_scale_accepts_the_right_sigma_and_rejects_wrong_ones():
    assert _prefix_variance_accepted(2.0, 2.0)
    assert not _prefix_variance_accepted(2.0 * 2 / 3, 2.0)
    assert not _prefix_variance_accepted(2.0 * 1.5, 2.0)


def test_float32_buffers_would_lose_the_slowest_decay():
    d = 1 - 1.2e-10
    assert np.float32(d) == 1.0
    blt = mf.BLT((d,), (0.5,))
    stream = mf.BLTNoise(blt, 4, 1.0, _source(3))
    assert stream.buffers.dtype == torch.float64
    for t in range(3):
        stream.step(t)
    # the buffer keeps decaying by d < 1 (in float32 it would be a plain running sum)
    assert 0 < float(stream.blt.decays[0]) < 1.0


def test_bad_parameters():
    with pytest.raises(ValueError, match=r"decays\[0\] must be in the open interval"):
        mf.BLT((1.0,), (0.5,)).check_strategy()
    with pytest.raises(ValueError, match=r"scales\[1\] must be > 0"):
        mf.BLT((0.9, 0.5), (0.5, -0.1)).check_strategy()
    with pytest.raises(ValueError, match="equal length"):
        mf.BLT((0.9, 0.5), (0.5,))
    with pytest.raises(ValueError, match="c_0 = 1"):
        mf.BandedNoise((2.0, 0.5), 4, 1.0, _source(1))


# == accounting and planning: events, rho, calibration, the command line ==========================

SMALL = ["dp-ftrl", "--rounds", "60", "--max-participations", "3", "--min-separation", "9",
         "--delta", "1e-6"]
MF_KEYS = {"rho", "epsilon", "epsilon_rdp", "delta", "noise_multiplier", "prefix_rmse",
           "noise_mechanism", "sensitivity_sq", "sensitivity_exact", "tree_prefix_rmse"}


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="fedsim")
    sub = parser.add_subparsers(dest="command", required=True)
    privacy_cli.add_parser(sub)
    try:
        args = parser.parse_args(["privacy", *argv])
        code = args.func(args)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _blt_event(z=3.0):
    blt = mf.BLT((0.99, 0.7), (0.1, 0.3))
    return MatrixFactorizationEvent(z, 3, 9, "blt", blt.decays + blt.scales), blt


def test_event_round_trips_through_json():
    event, _ = _blt_event()
    data = json.loads(json.dumps(event_to_dict(event)))
    assert data["type"] == "matrix_factorization"
    assert event_from_dict(data) == event
    with pytest.raises(ValueError, match="family must be one of"):
        MatrixFactorizationEvent(1.0, 1, 0, "dense", (1.0,))
    with pytest.raises(ValueError, match="decays then scales"):
        MatrixFactorizationEvent(1.0, 1, 0, "blt", (0.5, 0.5, 0.1))
    with pytest.raises(ValueError, match="c_0 = 1"):
        MatrixFactorizationEvent(1.0, 1, 0, "banded", (0.5, 0.1))


def test_ledger_rho_is_the_leading_blocks_sensitivity():
    event, blt = _blt_event(z=3.0)
    ledger = PrivacyLedger()
    acct = Accountant(1e-6)
    previous = 0.0
    for n in range(1, 41):
        predicted = acct.report_with(ledger, n - 1, event)
        ledger.record(n - 1, event)
        report = acct.report(ledger)
        assert report == predicted
        # independent: brute force over the n x n leading block
        if n <= 14:
            mat = mf.toeplitz_matrix(blt.coefs(n), n)
            ref = mf.brute_force_sensitivity_sq(mat, 3, 9) / (2 * 9.0)
            assert report.rho == pytest.approx(ref, rel=1e-12)
        assert report.rho >= previous
        previous = report.rho
    assert report.rho == mf_privacy(3.0, 40, 3, 9, 1e-6, "blt", event.params).rho
    assert report.epsilon == epsilon_from_rho(report.rho, 1e-6)
    assert report.noise_multiplier == 3.0


def test_mf_composes_with_other_events_and_refuses_mixed_strategies():
    event, _ = _blt_event()
    ledger = PrivacyLedger()
    ledger.record(0, event)
    ledger.record(1, TreeAggregationEvent(2.0, 1, 0))
    rho = Accountant(1e-6).report(ledger).rho
    assert rho == pytest.approx(1 / (2 * 9.0) + 1 / (2 * 4.0))
    ledger.record(2, MatrixFactorizationEvent(3.0, 3, 9, "banded", (1.0, 0.5)))
    with pytest.raises(ValueError, match="different"):
        Accountant(1e-6).report(ledger)


def test_calibration_never_overshoots():
    s, exact = mf_sensitivity_sq("banded", (1.0, 0.5, 0.25), 3, 4, 30)
    assert exact
    z = calibrate_mf_noise_multiplier(0.5, s)
    assert s / (2 * z * z) <= 0.5
    assert s / (2 * (z * (1 - 1e-5)) ** 2) > 0.5


def test_cli_blt_json_and_target_rho(capsys):
    code, out, err = _run([*SMALL, "--mechanism", "blt", "--buffers", "2", "--target-rho", "0.4",
                           "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert set(data) >= MF_KEYS | {"decays", "scales", "num_buffers"}
    assert data["noise_mechanism"] == "blt" and data["mechanism"] == "dp-ftrl"
    assert data["rho"] <= 0.4 and data["rho"] == pytest.approx(0.4, rel=1e-5)
    assert data["sensitivity_exact"] is True
    blt = mf.optimize_blt(60, 3, 9, 2)
    assert data["decays"] == list(blt.decays) and data["scales"] == list(blt.scales)
    assert data["noise_multiplier"] == pytest.approx(
        (data["sensitivity_sq"] / (2 * 0.4)) ** 0.5, rel=1e-5)
    # at the same rho the BLT's prefix sums are far less noisy than the tree's
    assert data["prefix_rmse"] < data["tree_prefix_rmse"] < data["tree_prefix_rmse_vanilla"]


def test_cli_blt_params_file_evaluates_given_parameters(tmp_path, capsys):
    path = tmp_path / "blt.json"
    path.write_text(json.dumps({"decays": [0.99, 0.7], "scales": [0.1, 0.3]}))
    code, out, err = _run([*SMALL, "--mechanism", "blt", "--blt-params", str(path),
                           "--noise-multiplier", "3", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    event, blt = _blt_event(z=3.0)
    assert data["rho"] == mf_privacy(3.0, 60, 3, 9, 1e-6, "blt", event.params).rho
    expected_rmse = 3.0 * float(mf.prefix_variances(blt.inverse_coefs(60)).mean()) ** 0.5
    assert data["prefix_rmse"] == pytest.approx(expected_rmse, rel=1e-12)
    # human-readable table names the parameters and the comparison
    code, out, _ = _run([*SMALL, "--mechanism", "blt", "--blt-params", str(path),
                         "--noise-multiplier", "3"], capsys)
    assert code == 0 and "BLT decays" in out and "tree at same rho" in out and "(exact)" in out


def test_cli_banded(capsys):
    code, out, err = _run([*SMALL, "--mechanism", "banded", "--noise-multiplier", "2", "--json"],
                          capsys)
    assert code == 0, err
    data = json.loads(out)
    # the coefficients (one per band: 314 at the Gboard setting) only when asked for
    assert data["bands"] == 10 and data["num_coefs"] == 10 and "coefs" not in data
    assert data["sensitivity_exact"] is True
    assert data["rho"] == pytest.approx(data["sensitivity_sq"] / 8.0)
    code, out, err = _run([*SMALL, "--mechanism", "banded", "--noise-multiplier", "2", "--json", "--coefficients"],
                          capsys)
    full = json.loads(out)
    assert code == 0 and len(full["coefs"]) == 10 and full["coefs"][0] == 1.0
    assert {k: v for k, v in full.items() if k != "coefs"} == data


def test_cli_dp_ftrl_help_names_every_mechanism(capsys):
    code, out, _ = _run(["dp-ftrl", "--help"], capsys)
    assert code == 0
    assert "tree aggregation" in out and "BLT" in out and "banded" in out and "--coefficients" in out


def test_cli_tree_json_gains_prefix_rmse(capsys):
    code, out, _ = _run([*SMALL, "--noise-multiplier", "2", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["noise_mechanism"] == "tree" and data["prefix_rmse"] > 0


@pytest.mark.parametrize("extra,message", [
    (["--mechanism", "blt", "--max-participations", "7"],
     "--max-participations 7 is infeasible with --rounds 60 and --min-separation 9"),
    (["--mechanism", "banded", "--bands", "11"], "--bands must be an integer in 1.."),
    (["--mechanism", "blt", "--bands", "3"], "--bands needs --mechanism banded"),
    (["--mechanism", "blt", "--buffers", "0"], "--buffers must be an integer in 1..12"),
    (["--mechanism", "blt", "--restart-every", "10"], "--restart-every applies to --mechanism tree"),
    (["--mechanism", "blt", "--max-iterations", "1"], "BLT optimisation did not converge"),
    (["--blt-params", "x.json"], "--blt-params needs --mechanism blt"),
    (["--mechanism", "bogus"], "invalid choice"),
])
def test_cli_bad_input_is_one_line_exit_2(extra, message, capsys):
    argv = [*SMALL, "--noise-multiplier", "2", *extra]  # a repeated flag: the last one counts
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


@pytest.mark.parametrize("content,message", [
    ({"decays": [1.2, 0.5], "scales": [0.1, 0.2]}, "decays[0] must be in the open interval (0, 1)"),
    ({"decays": [0.9, 0.0], "scales": [0.1, 0.2]}, "decays[1] must be in the open interval (0, 1)"),
    ({"decays": [0.9], "scales": [-0.1]}, "scales[0] must be > 0"),
    ({"decays": [0.9]}, "needs an object with keys 'decays' and 'scales'"),
    ({"decays": [0.9], "scales": [0.1], "extra": 1}, "unknown key 'extra'"),
    ({"decays": [0.9, 0.8], "scales": [0.1]}, "equal length"),
    ("not json", "not valid JSON"),
])
def test_cli_bad_params_file(tmp_path, capsys, content, message):
    path = tmp_path / "p.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    code, out, err = _run([*SMALL, "--noise-multiplier", "2", "--mechanism", "blt",
                           "--blt-params", str(path)], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and f"--blt-params {path}" in err and message in err
    code, _, err = _run([*SMALL, "--noise-multiplier", "2", "--mechanism", "blt",
                         "--blt-params", str(tmp_path / "missing.json")], capsys)
    assert code == 2 and "cannot read the file" in err


# == the mechanisms "blt" and "banded": releases, events, state, a real run ======================

P = 32


def _plan(argv: list[str], capsys) -> dict:
    parser = argparse.ArgumentParser(prog="fedsim")
    privacy_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["privacy", "dp-ftrl", *argv, "--json"])
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def test_registered_and_built_by_name():
    assert MECHANISMS.get("blt") is BLTMechanism and MECHANISMS.get("banded") is BandedMechanism
    assert issubclass(BLTMechanism, Mechanism) and issubclass(BandedMechanism, Mechanism)
    mech = build_mechanism("blt", {"buffers": 2, "estimator": "efficient"}, {"estimator": "efficient"},
                           noise_multiplier=2.0, clip_norm=0.5, max_participations=2,
                           min_separation=4)
    assert isinstance(mech, BLTMechanism) and mech.buffers == 2
    with pytest.raises(ValueError, match="estimator does not apply to mechanism = 'blt'"):
        build_mechanism("blt", {"estimator": "vanilla"}, {"estimator": "efficient"},
                        noise_multiplier=2.0, clip_norm=0.5)
    with pytest.raises(ValueError, match="bands must be <= min-separation \\+ 1 = 5"):
        BandedMechanism(noise_multiplier=1.0, clip_norm=1.0, min_separation=4, bands=6)
    with pytest.raises(ValueError, match="buffers must be <= 12"):
        BLTMechanism(noise_multiplier=1.0, clip_norm=1.0, buffers=13)
    with pytest.raises(ValueError, match=r"decays\[0\] must be in the open interval"):
        BLTMechanism(noise_multiplier=1.0, clip_norm=1.0, decays=[1.5], scales=[0.1])
    with pytest.raises(ValueError, match="scales must sum to < 1"):
        BLTMechanism(noise_multiplier=1.0, clip_norm=1.0, decays=[0.9, 0.5], scales=[0.6, 0.5])


@pytest.mark.parametrize("cls,tag", [(BLTMechanism, mf.TAG_BLT), (BandedMechanism, mf.TAG_BANDED)])
def test_increments_sum_to_the_factorized_noisy_prefix(cls, tag):
    z, clip, rounds = 1.5, 0.4, 24
    mech = cls(noise_multiplier=z, clip_norm=clip, max_participations=3, min_separation=5)
    source = NoiseSource(NoiseKey.from_seed(99))
    mech.setup(num_params=P, num_rounds=rounds, source=source)
    assert mech.factorization is not None
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(rounds, P, generator=gen)
    released = torch.stack([mech.release(t, xs[t]) for t in range(rounds)])
    # reference: A x + z C B xi with B = A C^-1, from the dense Toeplitz matrix
    n = rounds
    c = mech.factorization.coefs(n)
    xi = torch.stack([source.normal((tag, t), P) for t in range(n)]).double().numpy()
    a = np.tril(np.ones((n, n)))
    expected = a @ xs.double().numpy() + z * clip * (a @ np.linalg.solve(mf.toeplitz_matrix(c, n), xi))
    np.testing.assert_allclose(torch.cumsum(released.double(), 0).numpy(), expected, atol=2e-4)
    event = mech.privacy_event(rounds)
    assert isinstance(event, MatrixFactorizationEvent) and event.params == mech.factorization.params
    assert event.family == cls.name


@pytest.mark.parametrize("cls", [BLTMechanism, BandedMechanism])
def test_state_round_trip_replays_bit_for_bit(cls):
    source = NoiseSource(NoiseKey.from_seed(5))

    def fresh():
        m = cls(noise_multiplier=2.0, clip_norm=1.0, max_participations=2, min_separation=3)
        m.setup(num_params=P, num_rounds=20, source=source)
        return m

    first = fresh()
    for t in range(8):
        first.release(t, torch.zeros(P))
    saved = first.state_dict()
    tail = [first.release(t, torch.ones(P)) for t in range(8, 20)]
    second = fresh()
    second.load_state_dict(saved)
    for t, expected in zip(range(8, 20), tail, strict=True):
        assert torch.equal(second.release(t, torch.ones(P)), expected)
    other = cls(noise_multiplier=2.0, clip_norm=1.0, max_participations=2, min_separation=3)
    other.setup(num_params=P, num_rounds=30, source=source)  # another horizon: another strategy
    with pytest.raises(ValueError, match="another strategy"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match="expects round 20"):
        second.release(4, torch.zeros(P))


def test_privacy_event_needs_setup():
    mech = BLTMechanism(noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(RuntimeError, match="setup"):
        mech.privacy_event(0)


def test_target_rho_calibration_matches_the_planning_cli(capsys):
    strategy = DPFTRL(target_rho=0.5, mechanism="blt", buffers=2, max_participations=3,
                      min_separation=9)
    z = strategy.calibrated_noise_multiplier(num_rounds=60)
    plan = _plan(["--rounds", "60", "--max-participations", "3", "--min-separation", "9",
                  "--delta", "1e-6", "--target-rho", "0.5", "--mechanism", "blt", "--buffers", "2"],
                 capsys)
    assert z == plan["noise_multiplier"]
    event = MatrixFactorizationEvent(z, 3, 9, "blt", tuple(plan["decays"] + plan["scales"]))
    ledger = PrivacyLedger()
    for r in range(60):
        ledger.record(r, event)
    assert Accountant(1e-6).report(ledger).rho == plan["rho"] <= 0.5
    with pytest.raises(ValueError, match="buffers does not apply to mechanism = 'tree'"):
        DPFTRL(buffers=4)


def test_dp_ftrl_scenario_with_blt_final_rho_equals_the_plan(tmp_path: Path, capsys):
    out = tmp_path / "blt"
    proc = run_cli("run", str(SCENARIOS / "dp_ftrl.toml"), "--set", 'strategy.mechanism="blt"',
                   "--out", str(out), "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    plan = _plan(["--noise-multiplier", "6.5", "--rounds", "100", "--max-participations", "7",
                  "--min-separation", "13", "--delta", "1e-6", "--mechanism", "blt"], capsys)
    assert summary["stopped_reason"] == "completed"
    assert summary["rho"] == plan["rho"] and summary["epsilon"] == plan["epsilon"]
    assert plan["rho"] == mf_privacy(6.5, 100, 7, 13, 1e-6, "blt",
                                     tuple(plan["decays"] + plan["scales"])).rho
    ledger = json.loads((out / "ledger.json").read_text())
    assert len(ledger) == 100 and ledger[0]["event"]["type"] == "matrix_factorization"
    assert ledger[0]["event"]["params"] == plan["decays"] + plan["scales"]
    # a fresh secret key per run makes the accuracy random: 0.885 on average over 15 runs (sd
    # 0.011, lowest 0.869); 0.80 leaves seven standard deviations and still fails a model that
    # does not learn
    assert summary["accuracy"] >= 0.80
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rho"] for r in rows] == sorted(r["rho"] for r in rows)
