"""``fedsim privacy``: plan the privacy budget of a DP-FTRL or DP-FedAvg run.

::

    fedsim privacy dp-ftrl --noise-multiplier 7 --rounds 2000 --max-participations 6 \\
        --min-separation 313 [--restart-every R] --delta 1e-10 [--json]
    fedsim privacy dp-fedavg --noise-multiplier 1 --rounds 1000 --sampling-rate 0.01 --delta 1e-6
    fedsim privacy dp-fedavg --noise-multiplier 1 --rounds 1000 --max-participations 5 --delta 1e-6
    fedsim privacy dp-ftrl ... --target-rho 0.81     # solve for the noise multiplier
    fedsim privacy dp-ftrl ... --mechanism blt [--buffers 3 | --blt-params FILE.json]
    fedsim privacy dp-ftrl ... --mechanism banded [--bands B]

``--json`` prints one object with at least the keys ``rho``, ``epsilon``,
``epsilon_rdp``, ``delta``, ``noise_multiplier`` and, for dp-ftrl, ``prefix_rmse``
(the root-mean-square over rounds of the noise on the released prefix sums, per
coordinate, in units of the clip norm) and ``noise_mechanism``; the matrix-factorization
mechanisms add their parameters (BLT: ``decays`` and ``scales``; banded: ``bands`` and
``num_coefs``, and the ``coefs`` themselves, one per band, only with ``--coefficients``) and
the tree's RMSE at the same ``rho``. Bad input is one line ``error: ...`` on stderr and exit
code 2. :func:`plan` (``fedsim.plan`` from Python) returns the same object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

from fedsim.privacy.events import MIN_NOISE_MULTIPLIER

__all__ = ["add_parser", "plan", "run"]


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input as a single ``error: ...`` line (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


class _UsageError(Exception):
    pass


def _add_common(p: argparse.ArgumentParser) -> None:
    noise = p.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise-multiplier", type=float, metavar="Z",
                       help=f"noise standard deviation / clipping norm (a finite number >= {MIN_NOISE_MULTIPLIER:g})")
    noise.add_argument("--target-rho", type=float, metavar="RHO",
                       help="solve for the smallest noise multiplier with rho <= RHO (> 0)")
    p.add_argument("--rounds", type=int, required=True, metavar="T", help="number of rounds (>= 1)")
    p.add_argument("--delta", type=float, required=True, metavar="DELTA",
                   help="target delta, in (0, 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_parser(subparsers: Any) -> None:
    """Register the ``privacy`` subcommand on an argparse ``subparsers`` object.

    The chosen action is in ``args.func``; calling ``args.func(args)`` prints the
    result and returns the exit code (0, or 2 for bad input).
    """
    p = subparsers.add_parser(
        "privacy",
        help="plan the privacy budget of a run (rho, epsilon)",
        description="Privacy budget of a DP-FTRL or DP-FedAvg run, or the noise needed for a "
        "target rho. User-level (device-level) DP, zCDP accounting; see docs/privacy.md.",
    )
    # whatever parser class the caller uses, keep bad input to one line
    p.error = types.MethodType(_OneLineParser.error, p)  # type: ignore[method-assign]
    mech = p.add_subparsers(dest="mechanism", required=True, metavar="MECHANISM",
                            parser_class=_OneLineParser)

    ftrl = mech.add_parser(
        "dp-ftrl",
        help="DP-FTRL with correlated noise: tree aggregation, BLT or banded matrix factorization",
        description="DP-FTRL with correlated noise: tree aggregation (default), a buffered linear "
        "Toeplitz (BLT) or a banded matrix factorization (--mechanism); exact worst-case "
        "sensitivity under the participation limits.",
    )
    _add_common(ftrl)
    ftrl.add_argument("--max-participations", type=int, required=True, metavar="K",
                      help="contributions per device in the whole run (>= 1)")
    ftrl.add_argument("--min-separation", type=int, required=True, metavar="B",
                      help="rounds strictly between two contributions of a device (>= 0)")
    ftrl.add_argument("--restart-every", type=int, metavar="E",
                      help="start a new tree every E rounds (>= 1; default: never)")
    ftrl.add_argument("--mechanism", dest="noise_mechanism", default="tree",
                      choices=("tree", "blt", "banded"),
                      help="correlated noise: tree aggregation (default), a buffered linear "
                      "Toeplitz (BLT) or a banded matrix factorization")
    ftrl.add_argument("--estimator", default="efficient", choices=("efficient", "vanilla"),
                      help="tree estimator for the prefix-sum RMSE (default efficient)")
    ftrl.add_argument("--buffers", type=int, default=3, metavar="N",
                      help="BLT buffers to optimise (1..12, default 3)")
    ftrl.add_argument("--blt-params", metavar="FILE",
                      help="JSON file {\"decays\": [...], \"scales\": [...]} to evaluate "
                      "instead of optimising (--mechanism blt)")
    ftrl.add_argument("--bands", type=int, metavar="N",
                      help="bands of the banded strategy (1..min-separation + 1, default the maximum)")
    ftrl.add_argument("--error", dest="mf_error", default="max", choices=("max", "mean"),
                      help="prefix-sum error the strategy is optimised for (default max)")
    ftrl.add_argument("--max-iterations", type=int, default=2000, metavar="N",
                      help="L-BFGS iterations per start when optimising a strategy (default 2000)")
    ftrl.add_argument("--coefficients", action="store_true",
                      help="--mechanism banded --json: include the strategy's coefficients (coefs, "
                      "one per band; left out by default)")
    ftrl.set_defaults(func=run)

    fedavg = mech.add_parser(
        "dp-fedavg",
        help="DP-FedAvg (Gaussian mechanism, optionally with Poisson sampling)",
        description="DP-FedAvg: a Gaussian sum per round; with --sampling-rate, Poisson "
        "sampling of devices (epsilon amplified by sampling, rho not).",
    )
    _add_common(fedavg)
    fedavg.add_argument("--sampling-rate", type=float, metavar="Q",
                        help="Poisson sampling rate of devices, in (0, 1] (default: no sampling)")
    fedavg.add_argument("--max-participations", type=int, metavar="K",
                        help="contributions per device (>= 1; default: --rounds without "
                        "sampling, unlimited with it)")
    fedavg.add_argument("--min-separation", type=int, default=0, metavar="B",
                        help="rounds strictly between two contributions of a device (>= 0; default 0)")
    fedavg.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> None:
    def bad(flag: str, allowed: str, value: Any) -> None:
        raise _UsageError(f"{flag} must be {allowed} (got {value!r})")

    def finite(v: float) -> bool:
        return v is not None and math.isfinite(v)

    if args.noise_multiplier is not None and not (finite(args.noise_multiplier)
                                                  and args.noise_multiplier >= MIN_NOISE_MULTIPLIER):
        bad("--noise-multiplier", f"a finite number >= {MIN_NOISE_MULTIPLIER:g}", args.noise_multiplier)
    if args.target_rho is not None and not (finite(args.target_rho) and args.target_rho > 0):
        bad("--target-rho", "a finite number > 0", args.target_rho)
    if args.rounds < 1:
        bad("--rounds", "an integer >= 1", args.rounds)
    if not (finite(args.delta) and 0 < args.delta < 1):
        bad("--delta", "in the open interval (0, 1)", args.delta)
    if args.max_participations is not None and args.max_participations < 1:
        bad("--max-participations", "an integer >= 1", args.max_participations)
    if args.min_separation < 0:
        bad("--min-separation", "an integer >= 0", args.min_separation)
    restart = getattr(args, "restart_every", None)
    if restart is not None and restart < 1:
        bad("--restart-every", "an integer >= 1", restart)
    q = getattr(args, "sampling_rate", None)
    if q is not None and not (finite(q) and 0 < q <= 1):
        bad("--sampling-rate", "in (0, 1]", q)
    if args.mechanism == "dp-ftrl":
        _validate_mf(args, bad)


def _validate_mf(args: argparse.Namespace, bad: Any) -> None:
    mech = args.noise_mechanism
    if mech != "blt" and args.blt_params is not None:
        raise _UsageError("--blt-params needs --mechanism blt")
    if mech != "banded" and args.bands is not None:
        raise _UsageError("--bands needs --mechanism banded")
    if mech == "tree":
        return
    if args.restart_every is not None:
        raise _UsageError(f"--restart-every applies to --mechanism tree only, not {mech}")
    fit = -(-args.rounds // (args.min_separation + 1))
    if args.max_participations > fit:
        raise _UsageError(
            f"--max-participations {args.max_participations} is infeasible with --rounds "
            f"{args.rounds} and --min-separation {args.min_separation} (at most "
            f"ceil({args.rounds}/{args.min_separation + 1}) = {fit} contributions fit)"
        )
    if args.rounds < 2 and args.blt_params is None:
        bad("--rounds", f"an integer >= 2 to optimise a {mech} strategy", args.rounds)
    if not 1 <= args.buffers <= 12:
        bad("--buffers", "an integer in 1..12", args.buffers)
    if args.max_iterations < 1:
        bad("--max-iterations", "an integer >= 1", args.max_iterations)
    if args.bands is not None:
        top = min(args.min_separation + 1, args.rounds)
        if not 1 <= args.bands <= top:
            bad("--bands", f"an integer in 1..min(--min-separation + 1, --rounds) = 1..{top}",
                args.bands)


def _load_blt_params(path: str) -> Any:
    from fedsim.privacy.matrix_factorization import BLT

    where = f"--blt-params {path}"
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise _UsageError(f"{where}: cannot read the file ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise _UsageError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not {"decays", "scales"} <= set(data):
        raise _UsageError(f"{where}: needs an object with keys 'decays' and 'scales'")
    unknown = sorted(set(data) - {"decays", "scales", "family"})
    if unknown:
        raise _UsageError(f"{where}: unknown key {unknown[0]!r} (expected 'decays' and 'scales')")
    for key in ("decays", "scales"):
        if not isinstance(data[key], list) or not data[key]:
            raise _UsageError(f"{where}: {key} must be a non-empty list of numbers")
    try:
        return BLT(tuple(data["decays"]), tuple(data["scales"])).check_strategy()
    except ValueError as exc:
        raise _UsageError(f"{where}: {exc}") from None


def _compute(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    from fedsim.privacy.accountant import dp_fedavg_privacy, dp_ftrl_privacy
    from fedsim.privacy.calibration import calibrate_noise_multiplier, sensitivity_sq
    from fedsim.privacy.sensitivity import max_gaussian_participations

    notes: list[str] = []
    is_ftrl = args.mechanism == "dp-ftrl"
    sampling = None if is_ftrl else args.sampling_rate
    restart = args.restart_every if is_ftrl else None
    k = args.max_participations
    if not is_ftrl and k is None and sampling is None:
        k = args.rounds
    b = args.min_separation
    if k is not None:
        eff = max_gaussian_participations(args.rounds, k, b)
        if eff < k:
            notes.append(
                f"--max-participations {k} is infeasible with --rounds {args.rounds} and "
                f"--min-separation {b} (at most ceil({args.rounds}/{b + 1}) = {eff} contributions "
                f"fit); using effective max participations {eff}"
            )
    else:
        eff = max_gaussian_participations(args.rounds, None, b)

    with warnings.catch_warnings():
        # the infeasible-k warning is reported above, with the flag names
        warnings.simplefilter("ignore", UserWarning)
        s = sensitivity_sq(args.mechanism, rounds=args.rounds, max_participations=k,
                           min_separation=b, restart_every=restart, sampling_rate=sampling,
                           warn=False)
        z = args.noise_multiplier
        if args.target_rho is not None:
            z = calibrate_noise_multiplier(args.target_rho, args.mechanism, rounds=args.rounds,
                                           max_participations=k, min_separation=b,
                                           restart_every=restart, sampling_rate=sampling)
        if is_ftrl:
            report = dp_ftrl_privacy(z, args.rounds, k, b, args.delta, restart_every=restart)
        else:
            report = dp_fedavg_privacy(z, args.rounds, args.delta, sampling_rate=sampling,
                                       max_participations=args.max_participations
                                       if sampling is not None else k,
                                       min_separation=b)
    if is_ftrl and args.noise_mechanism != "tree":
        return _compute_mf(args, k, eff), notes
    result: dict[str, Any] = {
        "rho": report.rho,
        "epsilon": report.epsilon,
        "epsilon_rdp": report.epsilon_rdp,
        "delta": report.delta,
        "noise_multiplier": report.noise_multiplier,
        "mechanism": args.mechanism,
        "rounds": args.rounds,
        "max_participations": k,
        "effective_max_participations": eff,
        "min_separation": b,
        "sensitivity_sq": s,
    }
    if is_ftrl:
        result["restart_every"] = restart
        result["noise_mechanism"] = "tree"
        result["estimator"] = args.estimator
        result["prefix_rmse"] = report.noise_multiplier * _tree_rms(
            args.rounds, args.estimator, restart)
    else:
        result["sampling_rate"] = sampling
    if args.target_rho is not None:
        result["target_rho"] = args.target_rho
    return result, notes


def _tree_rms(rounds: int, estimator: str, restart: int | None) -> float:
    """sqrt(mean over rounds of the tree's prefix variance), in node-variance units."""
    from fedsim.privacy.tree_structure import prefix_variance

    total = sum(prefix_variance(t, estimator=estimator, restart_every=restart)  # type: ignore[arg-type]
                for t in range(rounds))
    return math.sqrt(total / rounds)


def _compute_mf(args: argparse.Namespace, k: int, eff: int) -> dict[str, Any]:
    from fedsim.privacy.accountant import mf_privacy, mf_sensitivity_sq
    from fedsim.privacy.calibration import calibrate_mf_noise_multiplier
    from fedsim.privacy.matrix_factorization import banded_strategy, blt_strategy
    from fedsim.privacy.sensitivity import max_tree_sensitivity_sq

    t, b = args.rounds, args.min_separation
    if args.noise_mechanism == "blt":
        given = None if args.blt_params is None else _load_blt_params(args.blt_params)
        strategy = blt_strategy(t, k, b, num_buffers=args.buffers, error=args.mf_error,
                                max_iter=args.max_iterations, blt=given)
    else:
        strategy = banded_strategy(t, k, b, bands=args.bands, error=args.mf_error,
                                   max_iter=args.max_iterations)
    s, exact = mf_sensitivity_sq(strategy.family, strategy.params, k, b, t)
    z = args.noise_multiplier
    if args.target_rho is not None:
        z = calibrate_mf_noise_multiplier(args.target_rho, s)
    report = mf_privacy(z, t, k, b, args.delta, strategy.family, strategy.params)
    variances = strategy.prefix_variances(t)
    rho = report.rho
    assert rho is not None
    tree_s = max_tree_sensitivity_sq(t, k, b)
    tree_z = math.sqrt(tree_s / (2.0 * rho))
    result: dict[str, Any] = {
        "rho": rho,
        "epsilon": report.epsilon,
        "epsilon_rdp": report.epsilon_rdp,
        "delta": report.delta,
        "noise_multiplier": report.noise_multiplier,
        "mechanism": "dp-ftrl",
        "noise_mechanism": args.noise_mechanism,
        "rounds": t,
        "max_participations": k,
        "effective_max_participations": eff,
        "min_separation": b,
        "sensitivity_sq": s,
        "sensitivity_exact": exact,
        "prefix_rmse": z * math.sqrt(float(variances.mean())),
        "prefix_max_std": z * math.sqrt(float(variances.max())),
        "optimised_for": None if args.blt_params is not None else f"{args.mf_error} error",
        **{key: value for key, value in strategy.to_dict().items() if key != "family"},
        "tree_noise_multiplier": tree_z,
        "tree_sensitivity_sq": tree_s,
        "tree_prefix_rmse": tree_z * _tree_rms(t, "efficient", None),
        "tree_prefix_rmse_vanilla": tree_z * _tree_rms(t, "vanilla", None),
    }
    if args.noise_mechanism == "blt":
        result["num_buffers"] = len(result["decays"])
    if args.target_rho is not None:
        result["target_rho"] = args.target_rho
    return result


def _mf_table(result: dict[str, Any]) -> str:
    mech = result["noise_mechanism"]
    k = result["max_participations"]
    rows = [
        ("mechanism", "dp-ftrl (BLT matrix factorization, "
         f"{result['num_buffers']} buffers)" if mech == "blt"
         else f"dp-ftrl (banded matrix factorization, {result['bands']} bands)"),
        ("noise multiplier", f"{result['noise_multiplier']:.6g}"),
    ]
    if "target_rho" in result:
        rows.append(("target rho", f"{result['target_rho']:.6g}"))
    rows += [
        ("rounds", str(result["rounds"])),
        ("max participations", f"{k}"),
        ("min separation", f"{result['min_separation']} rounds strictly between"),
        ("strategy", "optimised for " + result["optimised_for"] if result["optimised_for"]
         else "from --blt-params"),
    ]
    if mech == "blt":
        rows.append(("BLT decays", ", ".join(f"{d:.17g}" for d in result["decays"])))
        rows.append(("BLT scales", ", ".join(f"{v:.17g}" for v in result["scales"])))
    else:
        coefs = result["coefs"]
        shown = ", ".join(f"{c:.6g}" for c in coefs[:6]) + (", ..." if len(coefs) > 6 else "")
        rows.append(("band coefficients", shown + "  (all: --json --coefficients)"))
    rows += [
        ("sensitivity^2", f"{result['sensitivity_sq']:.6g} C^2  ("
         + ("exact" if result["sensitivity_exact"] else "upper bound") + ")"),
        ("rho (zCDP)", f"{result['rho']:.6g}"),
        ("delta", f"{result['delta']:g}"),
        ("epsilon", f"{result['epsilon']:.4f}  (exact Gaussian conversion)"),
        ("epsilon_rdp", f"{result['epsilon_rdp']:.4f}  (RDP conversion)"),
        ("prefix-sum RMSE", f"{result['prefix_rmse']:.4g} C  (worst round: std "
         f"{result['prefix_max_std']:.4g} C)"),
        ("tree at same rho", f"noise multiplier {result['tree_noise_multiplier']:.4g}, "
         f"prefix-sum RMSE {result['tree_prefix_rmse']:.4g} C efficient, "
         f"{result['tree_prefix_rmse_vanilla']:.4g} C vanilla"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _table(result: dict[str, Any]) -> str:
    if result.get("noise_mechanism") in ("blt", "banded"):
        return _mf_table(result)
    is_ftrl = result["mechanism"] == "dp-ftrl"
    k = result["max_participations"]
    rows = [
        ("mechanism", "dp-ftrl (tree aggregation)" if is_ftrl else (
            "dp-fedavg (Poisson sampling)" if result.get("sampling_rate") is not None
            else "dp-fedavg (Gaussian, no sampling)")),
        ("noise multiplier", f"{result['noise_multiplier']:.6g}"),
    ]
    if "target_rho" in result:
        rows.append(("target rho", f"{result['target_rho']:.6g}"))
    rows.append(("rounds", str(result["rounds"])))
    if not is_ftrl and result.get("sampling_rate") is not None:
        rows.append(("sampling rate", f"{result['sampling_rate']:.6g}"))
    rows.append(("max participations",
                 "unlimited" if k is None else
                 f"{k}" + ("" if result["effective_max_participations"] >= k
                           else f" (effective {result['effective_max_participations']})")))
    rows.append(("min separation", f"{result['min_separation']} rounds strictly between"))
    if is_ftrl:
        rows.append(("restart every", "never" if result["restart_every"] is None
                     else f"{result['restart_every']} rounds"))
        rows.append(("sensitivity^2 (S)", f"{result['sensitivity_sq']} C^2"))
    else:
        rows.append(("contributions (m)", f"{result['sensitivity_sq']} (rho bound, unamplified)"))
    rows += [
        ("rho (zCDP)", f"{result['rho']:.6g}"),
        ("delta", f"{result['delta']:g}"),
        ("epsilon", f"{result['epsilon']:.4f}"
         + ("  (RDP, amplified by sampling)" if not is_ftrl and result.get("sampling_rate")
            is not None else "  (exact Gaussian conversion)")),
        ("epsilon_rdp", f"{result['epsilon_rdp']:.4f}  (RDP conversion)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    """Execute ``fedsim privacy <mechanism>``; returns the exit code."""
    try:
        _validate(args)
        result, notes = _compute(args)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # anything the library rejects that the checks above missed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(_json_object(args, result)))
    else:
        print(_table(result))
    return 0


def _json_object(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """What ``--json`` prints: the banded strategy's coefficients only with ``--coefficients``."""
    if "coefs" not in result:
        return result
    out = {k: v for k, v in result.items() if k != "coefs" or getattr(args, "coefficients", False)}
    out["num_coefs"] = len(result["coefs"])
    return out


def plan(mechanism: str, argv: Sequence[str]) -> dict[str, Any]:
    """The object ``fedsim privacy MECHANISM ARGV --json`` prints (``fedsim.plan`` calls this).

    ``argv`` are the command's flags; they are parsed by the command's own parser, so defaults,
    checks and results are the command's.

    Raises
    ------
    ValueError
        Bad input, with the message the command prints after ``error:``. The command's
        ``warning:`` notes are issued as ``UserWarning``.
    """
    parser = argparse.ArgumentParser(prog="fedsim")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(["privacy", mechanism, *argv, "--json"])
    except SystemExit:
        message = captured.getvalue().strip().splitlines()
        raise ValueError((message[-1] if message else "invalid arguments").removeprefix("error: ")) from None
    try:
        _validate(args)
        result, notes = _compute(args)
    except _UsageError as exc:
        raise ValueError(str(exc)) from None
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    return _json_object(args, result)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m fedsim.privacy.cli privacy ...``)."""
    parser = _OneLineParser(prog="fedsim")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
