"""Timing of the privacy accounting hot paths.

Run with ``python scripts/bench_privacy.py``. It prints:

* the exact Gboard es-ES DP-FTRL sensitivity (T=2000, k=6, b=313; S=79, rho=0.806)
  from cold caches and warm;
* ``S_n`` for every prefix n = 1..2000 in one pass;
* a simulated 2000-round run that asks the accountant for a report after every
  round (plus a budget-guard ``report_with`` before each round);
* a few other configurations, and the ``fedsim privacy`` command end to end;
* matrix-factorization DP-FTRL: the BLT and banded optimisers at the Gboard parameters, a
  2000-round BLT run's per-round accounting, and the server's noise per round (ms and state
  memory) of the tree, BLT and banded streams for a 1.3M-parameter model (``--params``).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedsim.privacy import accountant as accountant_module  # noqa: E402
from fedsim.privacy import sensitivity  # noqa: E402
from fedsim.privacy.accountant import Accountant, dp_ftrl_privacy  # noqa: E402
from fedsim.privacy.events import PrivacyLedger, TreeAggregationEvent  # noqa: E402


def _clear_caches() -> None:
    accountant_module.clear_caches()


def _timed(fn, repeat: int = 1):
    best = float("inf")
    value = None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return value, best


def _state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_state_bytes(v) for v in state)
    return 0


def bench_server_noise(num_params: int, rounds: int, warmup: int = 3) -> None:
    """ms per round and state memory of each DP-FTRL noise stream for a ``num_params`` model."""
    from fedsim.privacy import matrix_factorization as mf
    from fedsim.privacy.noise import NoiseKey, NoiseSource
    from fedsim.privacy.tree_noise import TreeNoise

    torch.set_num_threads(1)
    source = NoiseSource(NoiseKey.generate())
    T, k, b = 2000, 6, 313
    blt = mf.optimize_blt(T, k, b, 3)
    band14 = mf.optimize_banded(100, 7, 13)  # scenarios/dp_ftrl.toml: b = 13, 14 bands
    streams = [
        ("one Gaussian draw (baseline)", None),
        ("tree, vanilla", TreeNoise(num_params, 1.0, source, estimator="vanilla")),
        ("tree, efficient", TreeNoise(num_params, 1.0, source, estimator="efficient")),
        ("BLT, 3 buffers (Gboard-optimised)", mf.BLTNoise(blt, num_params, 1.0, source)),
        ("banded, 14 bands (dp_ftrl.toml)", mf.BandedNoise(band14, num_params, 1.0, source)),
    ]
    print(f"Server noise per round, {num_params / 1e6:.1f}M parameters, one thread "
          f"(mean of rounds {warmup}..{warmup + rounds - 1}):")
    for label, stream in streams:
        times = []
        for t in range(warmup + rounds):
            start = time.perf_counter()
            if stream is None:
                source.normal((0x42454E43, t), num_params)
            else:
                stream.step(t)
            if t >= warmup:
                times.append(time.perf_counter() - start)
        mem = 0 if stream is None else _state_bytes(stream.state_dict())
        note = ""
        if isinstance(stream, TreeNoise):
            note = f"  (after {warmup + rounds} rounds; at most log2(T) + 1 = 12 nodes at T = 2000)"
        print(f"  {label:<36} {1e3 * sum(times) / len(times):8.2f} ms/round   state "
              f"{mem / 2**20:8.1f} MiB{note}")
    print(f"  banded with 314 bands (Gboard b = 313) would hold 313 vectors: "
          f"{313 * num_params * 4 / 2**20:.0f} MiB")


def bench_mf_planning() -> None:
    """Optimiser and accountant cost of the matrix-factorization mechanisms (Gboard parameters)."""
    from fedsim.privacy import matrix_factorization as mf
    from fedsim.privacy.accountant import mf_sensitivity_sq
    from fedsim.privacy.events import MatrixFactorizationEvent

    T, k, b, z, delta = 2000, 6, 313, 4.03, 1e-10
    print(f"Matrix factorization at T={T}, k={k}, b={b}:")
    mf.optimize_blt.cache_clear()
    blt, t_blt = _timed(lambda: mf.optimize_blt(T, k, b, 3))
    sens = mf.toeplitz_sensitivity_sq(blt.coefs(T), T, k, b).value
    err = float(mf.prefix_variances(blt.inverse_coefs(T)).max())
    print(f"  optimize_blt (3 buffers)     {t_blt:8.2f} s    sens^2={sens:.3f} max var={err:.3f} "
          f"product={sens * err:.2f}")
    mf.optimize_banded.cache_clear()
    band, t_band = _timed(lambda: mf.optimize_banded(T, k, b))
    sens = mf.toeplitz_sensitivity_sq(band, T, k, b).value
    err = float(mf.prefix_variances(mf.inverse_coefs(band, T)).max())
    print(f"  optimize_banded (314 bands)  {t_band:8.2f} s    sens^2={sens:.3f} max var={err:.3f} "
          f"product={sens * err:.2f}")

    def simulated_run():
        ledger = PrivacyLedger()
        acc = Accountant(delta)
        event = MatrixFactorizationEvent(z, k, b, "blt", blt.decays + blt.scales)
        last = None
        for r in range(T):
            acc.report_with(ledger, r, event)
            ledger.record(r, event)
            last = acc.report(ledger)
        return last

    mf_sensitivity_sq.cache_clear()
    last, t_run = _timed(simulated_run)
    assert last is not None and math.isfinite(last.rho)
    print(f"  {T}-round BLT run, report_with + report every round: {t_run:.3f} s total "
          f"({t_run / T * 1e3:.3f} ms per round), final rho={last.rho:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cli", action="store_true", help="do not time the CLI subprocess")
    parser.add_argument("--params", type=float, default=1.3e6,
                        help="model size for the server-noise rows (default 1.3e6)")
    parser.add_argument("--noise-rounds", type=int, default=20,
                        help="timed rounds per noise stream (default 20; 0 skips the rows)")
    args = parser.parse_args()

    T, k, b, z, delta = 2000, 6, 313, 7.0, 1e-10
    print(f"Gboard es-ES DP-FTRL: T={T}, k={k}, b={b}, z={z}, delta={delta:g}")

    _clear_caches()
    s, cold = _timed(lambda: sensitivity.max_tree_sensitivity_sq(T, k, b))
    _, warm = _timed(lambda: sensitivity.max_tree_sensitivity_sq(T, k, b), repeat=20)
    print(f"  S = {s}   rho = {s / (2 * z * z):.4f}")
    print(f"  max_tree_sensitivity_sq      cold {cold * 1e3:8.2f} ms   warm {warm * 1e3:8.3f} ms")

    def all_prefixes():
        return sensitivity.TreePrefixSensitivity(k, b).prefixes(T)

    prefixes, t_pref = _timed(all_prefixes, repeat=3)
    assert prefixes[-1] == s
    print(f"  S_n for all n = 1..{T}        {t_pref * 1e3:8.2f} ms   (one pass)")

    _clear_caches()
    report, t_plan = _timed(lambda: dp_ftrl_privacy(z, T, k, b, delta))
    print(f"  dp_ftrl_privacy (cold)       {t_plan * 1e3:8.2f} ms   rho={report.rho:.3f} "
          f"epsilon={report.epsilon:.2f} epsilon_rdp={report.epsilon_rdp:.2f}")

    def simulated_run():
        ledger = PrivacyLedger()
        acc = Accountant(delta)
        event = TreeAggregationEvent(z, k, b)
        last = None
        for r in range(T):
            acc.report_with(ledger, r, event)
            ledger.record(r, event)
            last = acc.report(ledger)
        return last

    _clear_caches()
    last, t_run = _timed(simulated_run)
    assert last == report
    print(f"  {T}-round run, report_with + report every round: {t_run:.3f} s total "
          f"({t_run / T * 1e3:.3f} ms per round)")

    print("Other configurations (cold caches):")
    for cfg in [(2000, 6, 313, 500), (10000, 20, 100, None), (2000, 50, 10, None),
                (2000, 2000, 0, None), (100000, 5, 5000, None), (4096, 10, 300, 1)]:
        _clear_caches()
        value, t = _timed(lambda cfg=cfg: sensitivity.max_tree_sensitivity_sq(*cfg))
        n, kk, bb, e = cfg
        if n <= 10000:
            _, tp = _timed(lambda kk=kk, bb=bb, e=e, n=n: sensitivity.TreePrefixSensitivity(
                kk, bb, e).prefixes(n))
            extra = f"   all prefixes {tp * 1e3:8.1f} ms"
        else:
            extra = ""
        print(f"  T={n:<6} k={kk:<5} b={bb:<5} E={e!s:<5} S={value:<9} {t * 1e3:8.2f} ms{extra}")

    if not args.skip_cli:
        cmd = [sys.executable, "-m", "fedsim.privacy_cli", "privacy", "dp-ftrl",
               "--noise-multiplier", "7", "--rounds", "2000", "--max-participations", "6",
               "--min-separation", "313", "--delta", "1e-10", "--json"]
        start = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        print(f"CLI `fedsim privacy dp-ftrl ... --json`: {wall:.2f} s wall (interpreter start and "
              f"imports included), exit {res.returncode}")
        print("  " + res.stdout.strip())
    bench_mf_planning()
    if args.noise_rounds > 0:
        bench_server_noise(int(args.params), args.noise_rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
