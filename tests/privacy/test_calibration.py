"""Noise calibration: never overshoots the target, and is the smallest such noise (to 1e-6)."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.privacy import (
    calibrate_noise_multiplier,
    dp_fedavg_privacy,
    dp_ftrl_privacy,
    sensitivity_sq,
)

REL_TOL = 1e-6


def test_gboard_calibration():
    z = calibrate_noise_multiplier(79 / 98, "dp-ftrl", rounds=2000, max_participations=6,
                                   min_separation=313)
    assert z == pytest.approx(7.0, rel=2e-6)
    assert dp_ftrl_privacy(z, 2000, 6, 313, 1e-10).rho <= 79 / 98


@settings(max_examples=200, deadline=None)
@given(
    target=st.floats(min_value=1e-4, max_value=1e3),
    rounds=st.integers(min_value=1, max_value=300),
    k=st.integers(min_value=1, max_value=12),
    b=st.integers(min_value=0, max_value=40),
    restart=st.one_of(st.none(), st.integers(min_value=1, max_value=300)),
)
def test_dp_ftrl_calibration_never_overshoots(target, rounds, k, b, restart):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        z = calibrate_noise_multiplier(target, "dp-ftrl", rounds=rounds, max_participations=k,
                                       min_separation=b, restart_every=restart)
        report = dp_ftrl_privacy(z, rounds, k, b, 1e-6, restart_every=restart)
        assert report.rho <= target
        # and it is the smallest such noise up to the tolerance
        smaller = z / (1 + 2 * REL_TOL)
        assert dp_ftrl_privacy(smaller, rounds, k, b, 1e-6, restart_every=restart).rho > target


@settings(max_examples=200, deadline=None)
@given(
    target=st.floats(min_value=1e-4, max_value=1e3),
    rounds=st.integers(min_value=1, max_value=5000),
    k=st.one_of(st.none(), st.integers(min_value=1, max_value=100)),
    b=st.integers(min_value=0, max_value=50),
    q=st.one_of(st.none(), st.floats(min_value=1e-3, max_value=1.0)),
)
def test_dp_fedavg_calibration_never_overshoots(target, rounds, k, b, q):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        z = calibrate_noise_multiplier(target, "dp-fedavg", rounds=rounds, max_participations=k,
                                       min_separation=b, sampling_rate=q)
        s = sensitivity_sq("dp-fedavg", rounds=rounds, max_participations=k, min_separation=b)
        rho = s / (2.0 * z * z)
        assert rho <= target
        assert s / (2.0 * (z / (1 + 2 * REL_TOL)) ** 2) > target
        if q is None:  # the planning function reports exactly this rho
            assert dp_fedavg_privacy(z, rounds, 1e-6, max_participations=k,
                                     min_separation=b).rho <= target


def test_calibration_warns_on_infeasible_k():
    with pytest.warns(UserWarning, match="effective max_participations=7"):
        calibrate_noise_multiplier(0.8, "dp-ftrl", rounds=2000, max_participations=10,
                                   min_separation=313)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_rho=0.0, rounds=10, max_participations=1),
        dict(target_rho=-1.0, rounds=10, max_participations=1),
        dict(target_rho=float("inf"), rounds=10, max_participations=1),
        dict(target_rho=1.0, rounds=0, max_participations=1),
        dict(target_rho=1.0, rounds=10, max_participations=0),
        dict(target_rho=1.0, rounds=10),  # dp-ftrl needs k
        dict(target_rho=1.0, rounds=10, max_participations=1, mechanism="laplace"),
        dict(target_rho=1.0, rounds=10, max_participations=1, min_separation=-1),
        dict(target_rho=1.0, rounds=10, max_participations=1, rel_tol=0.0),
    ],
)
def test_calibration_bad_inputs(kwargs):
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(**kwargs)
