"""zCDP -> (epsilon, delta) conversions: golden values, references, properties."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.privacy.conversions import (
    epsilon_from_rho,
    epsilon_naive_from_rho,
    epsilon_rdp_from_rho,
    gaussian_delta,
)

GBOARD_RHO = 79 / (2 * 7**2)


def test_gboard_golden_values():
    assert round(GBOARD_RHO, 3) == 0.806
    assert round(epsilon_from_rho(GBOARD_RHO, 1e-10), 2) == 8.53
    assert round(epsilon_rdp_from_rho(GBOARD_RHO, 1e-10), 2) == 8.90
    assert round(epsilon_naive_from_rho(GBOARD_RHO, 1e-10), 2) == 9.42


def test_analytic_profile_hits_delta():
    for rho in (1e-4, 0.01, 0.5, GBOARD_RHO, 3.0, 50.0):
        for delta in (1e-12, 1e-6, 1e-3):
            eps = epsilon_from_rho(rho, delta)
            mu = math.sqrt(2 * rho)
            if eps > 0:
                assert gaussian_delta(eps, mu) == pytest.approx(delta, rel=1e-7)
            else:
                assert gaussian_delta(0.0, mu) <= delta


def test_analytic_against_dp_accounting_pld():
    # a Gaussian mechanism with noise z (sensitivity 1) is 1/(2 z^2)-zCDP
    for z, delta in [(7 / math.sqrt(79), 1e-10), (1.0, 1e-5), (3.0, 1e-6), (0.5, 1e-3)]:
        acc = pld.PLDAccountant(value_discretization_interval=1e-4)
        acc.compose(dp_accounting.GaussianDpEvent(z))
        reference = acc.get_epsilon(delta)
        assert epsilon_from_rho(1 / (2 * z * z), delta) == pytest.approx(reference, rel=2e-3, abs=2e-3)


def test_rdp_conversion_matches_dense_grid_and_dp_accounting():
    for rho in (1e-6, 1e-3, 0.1, GBOARD_RHO, 5.0, 300.0):
        for delta in (1e-12, 1e-8, 1e-5, 0.1):
            alpha = 1 + np.exp(np.linspace(-25, 25, 400_001))
            grid = rho * alpha + np.log1p(-1 / alpha) - (math.log(delta) + np.log(alpha)) / (alpha - 1)
            expected = max(0.0, float(grid.min()))
            got = epsilon_rdp_from_rho(rho, delta)
            assert got == pytest.approx(expected, rel=1e-7, abs=1e-9)
    # dp_accounting's RDP accountant on a Gaussian (discrete orders) can only be larger
    for z, delta in [(7 / math.sqrt(79), 1e-10), (1.0, 1e-5), (2.5, 1e-7)]:
        acc = rdp.RdpAccountant()
        acc.compose(dp_accounting.GaussianDpEvent(z))
        reference = acc.get_epsilon(delta)
        ours = epsilon_rdp_from_rho(1 / (2 * z * z), delta)
        assert ours <= reference + 1e-9
        assert ours == pytest.approx(reference, rel=1e-2)


@settings(max_examples=200, deadline=None)
@given(
    rho=st.floats(min_value=1e-6, max_value=1e3),
    log_delta=st.floats(min_value=-30, max_value=-0.1),
)
def test_conversions_are_ordered(rho, log_delta):
    delta = math.exp(log_delta)
    tight = epsilon_from_rho(rho, delta)
    via_rdp = epsilon_rdp_from_rho(rho, delta)
    naive = epsilon_naive_from_rho(rho, delta)
    assert 0 <= tight <= via_rdp * (1 + 1e-9) + 1e-12
    assert via_rdp <= naive * (1 + 1e-9) + 1e-12


@settings(max_examples=100, deadline=None)
@given(
    rho1=st.floats(min_value=1e-5, max_value=100),
    factor=st.floats(min_value=1.001, max_value=10),
    log_delta=st.floats(min_value=-25, max_value=-1),
)
def test_conversions_increase_with_rho(rho1, factor, log_delta):
    delta = math.exp(log_delta)
    rho2 = rho1 * factor
    assert epsilon_from_rho(rho1, delta) <= epsilon_from_rho(rho2, delta) + 1e-12
    assert epsilon_rdp_from_rho(rho1, delta) <= epsilon_rdp_from_rho(rho2, delta) + 1e-12


def test_edge_values():
    for fn in (epsilon_from_rho, epsilon_rdp_from_rho, epsilon_naive_from_rho):
        assert fn(0.0, 1e-6) == 0.0
    assert epsilon_from_rho(math.inf, 1e-6) == math.inf
    assert epsilon_rdp_from_rho(math.inf, 1e-6) == math.inf


@pytest.mark.parametrize("fn", [epsilon_from_rho, epsilon_rdp_from_rho, epsilon_naive_from_rho])
@pytest.mark.parametrize(
    "rho,delta,match",
    [(-0.1, 1e-6, "rho"), (math.nan, 1e-6, "rho"), ("x", 1e-6, "rho"), (0.5, 0.0, "delta"),
     (0.5, 1.0, "delta"), (0.5, -1e-3, "delta"), (0.5, math.nan, "delta"), (0.5, None, "delta")],
)
def test_bad_inputs(fn, rho, delta, match):
    with pytest.raises(ValueError, match=match):
        fn(rho, delta)
