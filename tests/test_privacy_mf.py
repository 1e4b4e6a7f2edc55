"""Accounting and planning of matrix-factorization DP-FTRL: events, rho, calibration, CLI."""

from __future__ import annotations

import argparse
import json

import pytest

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
