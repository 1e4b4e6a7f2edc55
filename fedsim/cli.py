"""Command line: ``fedsim run SCENARIO``, ``fedsim run --resume RUN_DIR``, ``fedsim privacy ...``,
``fedsim sweep SCENARIO --grid KEY=V1,V2 ...`` (:mod:`fedsim.sweep`), ``fedsim audit RUN_DIR``.

Bad input never produces a traceback: it is one line ``error: <where>: <what is allowed>`` on
stderr and exit code 2. A run that stops because its model became NaN or inf prints its summary
and one ``error: non-finite model: ...`` line, exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim import __version__
from fedsim.errors import FedsimError, ScenarioError, ScenarioNote


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line ``error:`` convention (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a scenario file", description="Run a scenario (TOML) end to end.")
    p.add_argument(
        "scenario",
        nargs="?",
        help="path to a scenario TOML file (see scenarios/); optional with --resume",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last good checkpoint (scenario: RUN_DIR/config.toml; "
        "a scenario or overrides given too must not change it)",
    )
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--seed", type=int, help="override the root seed")
    p.add_argument("--out", help="run directory (default: the scenario's output-dir); must not hold an earlier run")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in the run directory (without it fedsim refuses to touch one)",
    )
    p.add_argument(
        "--backend",
        choices=("inprocess", "flower", "ray"),
        help="execution backend, overrides engine.backend: fedsim's in-process engine (default), "
        "Flower's simulation engine running the same strategy through the Flower bridge, or fedsim's "
        "engine with cohort training sharded over Ray workers (engine.ray-address, engine.ray-workers)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any scenario key, e.g. --set client.lr=0.05 --set strategy.server-lr=0.5",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    # the scenario is validated before anything imports torch, flwr or ray: a bad value comes back fast
    from fedsim.scenario import load_scenario, parse_override

    overrides = [parse_override(text) for text in args.overrides]
    for flag, key in (("rounds", "rounds"), ("seed", "seed"), ("out", "output-dir")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(([key], value, f"--{flag}"))
    if args.backend is not None:
        if args.resume is not None and args.backend == "flower":
            raise FedsimError("--backend flower cannot be combined with --resume")
        overrides.append((["engine", "backend"], args.backend, "--backend"))
    if args.out is not None and not args.out.strip():
        raise FedsimError("--out: must be a directory path, got ''")
    if args.resume is not None:
        if args.overwrite:
            raise FedsimError("--overwrite cannot be combined with --resume (which continues the run in RUN_DIR)")
        sim = _resumed_simulation(args, overrides)
    else:
        if args.scenario is None:
            raise FedsimError("run: a scenario file is required (or --resume RUN_DIR)")
        scenario = load_scenario(args.scenario, overrides)
        from fedsim.tracking import check_available

        check_available(scenario.log)
        from fedsim.engine.rundir import claim_run_dir, is_run_dir

        run_dir = Path(scenario.output_dir)
        replacing = is_run_dir(run_dir)
        claim_run_dir(run_dir, overwrite=args.overwrite)
        if replacing:
            print(f"--overwrite: removed the earlier run in {run_dir}", file=sys.stderr)
        from fedsim.backends import open_run

        sim = open_run(scenario, run_dir=scenario.output_dir, progress=not args.quiet)
    for line in _start_notes(sim):
        print(line, file=sys.stderr, flush=True)
    result = sim.run()
    s = result.summary
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(_summary_text(s, result.run_dir, process_s=_process_seconds()))
    from fedsim.engine.rounds import NON_FINITE

    if str(s.get("stopped_reason", "")).startswith(NON_FINITE):
        # the run stopped: its model is garbage, whatever privacy figure it reports
        print(f"error: {_one_line(Exception(s['stopped_reason']))}", file=sys.stderr)
        return 1
    return 0


def _start_notes(sim: Any) -> list[str]:
    """What a run says before its first round: the noise multiplier its strategy uses (solved from
    ``target-rho`` where given) and, for DP-FedAvg without amplification, how to get it."""
    scenario = sim.scenario
    lines = []
    z = _noise_multiplier(sim)
    if z is not None:
        target = scenario.strategy.params.get("target_rho")
        how = f" (solved from target-rho = {target:g})" if target is not None else ""
        strategy = getattr(sim, "strategy", None)
        deployed = getattr(strategy, "deployment_noise_multiplier", None)
        if deployed is not None:
            n, big = scenario.clients_per_round, scenario.privacy.equivalent_cohort
            lines.append(
                f"{scenario.name}: deployment-equivalent noise: multiplier {deployed:.4f}{how} for {big:,} clients "
                f"per round; this run adds {z:.4g} x clip norm to the sum of its {n} (= {deployed:.4f} x {n} / {big:,})"
            )
            deployed_count = getattr(strategy, "deployment_count_noise_multiplier", None)
            if deployed_count is not None:
                zb = strategy.adaptive.count_noise_multiplier
                lines.append(
                    f"{scenario.name}: adaptive clipping: the clipped count's noise multiplier {deployed_count:.4f} is the "
                    f"deployment's; this run adds {zb / 2:.4g} to its count of {n} bits (= {deployed_count:.4f} / 2 x {n} / {big:,})"
                )
        else:
            lines.append(f"{scenario.name}: noise multiplier {z:.4f}{how}")
    if scenario.strategy.name == "dp-fedavg" and scenario.strategy.params.get("sampling", "fixed") == "fixed":
        lines.append(
            f"{scenario.name}: dp-fedavg samples a fixed cohort (sampling = \"fixed\"): no amplification by "
            "sampling, unlike Opacus and TFF; strategy.sampling = \"poisson\" samples each device independently "
            "and amplifies epsilon"
        )
    return lines


def _noise_multiplier(sim: Any) -> float | None:
    """The noise multiplier of the run's DP strategy (``None`` for a non-DP run, or one whose
    strategy runs in another process: ``summary.json`` has it)."""
    z = getattr(sim, "noise_multiplier", None)
    return z if isinstance(z, float) else None


def _process_seconds() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # no psutil, or a platform without process start times
        return None


def _resumed_simulation(args: argparse.Namespace, overrides: list) -> Any:
    """A :class:`Simulation` of the run in ``--resume RUN_DIR``, restored from its checkpoint."""
    from fedsim.engine import Simulation
    from fedsim.engine.checkpoint import CheckpointError, scenario_diff
    from fedsim.scenario import load_scenario

    run_dir = Path(args.resume)
    if args.out is not None:
        raise FedsimError("--out cannot be combined with --resume: the run directory is RUN_DIR")
    if not run_dir.is_dir():
        raise FedsimError(f"--resume: {run_dir}: no such run directory")
    config = run_dir / "config.toml"
    if not config.is_file():
        raise FedsimError(f"--resume: {run_dir}: not a run directory (no config.toml)")
    here = [(["output-dir"], str(run_dir))]
    scenario = load_scenario(config, here)
    if args.scenario is not None or overrides:
        requested = load_scenario(args.scenario or config, overrides + here)
        diff = scenario_diff(scenario.to_dict(), requested.to_dict())
        if diff:
            raise CheckpointError(
                f"--resume: the scenario differs from the run in {run_dir} in: {', '.join(diff)} "
                "(resume with the recorded scenario, or start a new run)"
            )
        scenario = requested
    sim = Simulation(scenario, run_dir=run_dir, progress=not args.quiet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = sim.resume()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"resuming {run_dir} after round {done} of {scenario.rounds}", file=sys.stderr)
    return sim


def _equivalent_lines(eq: dict) -> list[str]:
    """The deployment-equivalent guarantee, labelled as a statement about a configuration."""
    pop = f"{eq['population']:,} devices stated" if eq.get("population") else "population not stated"
    return [
        f"deployment-equivalent  rho {eq['rho']:.4f}, epsilon {eq['epsilon']:.3f} at delta={eq['delta']:g}: "
        f"a deployment of {eq['cohort']:,} clients per round at noise multiplier {eq['noise_multiplier']:.4f}",
        f"             (needs >= {eq['min_population']:,} devices under (k, b); {pop}); this run added its "
        f"noise per client (multiplier {eq['simulated_noise_multiplier']:.4g} on {eq['clients_per_round']} clients): "
        "a statement about that configuration, not about this run",
    ]


def _summary_text(s: dict, run_dir: object, *, process_s: float | None = None) -> str:
    lines = [
        f"scenario     {s['name']} ({s['strategy']})",
        f"rounds       {s['rounds']} / {s['rounds_planned']}  ({s['stopped_reason']})",
        f"accuracy     {s['accuracy']:.4f}",
        f"loss         {s['loss']:.4f}",
    ]
    if s.get("noise_multiplier") is not None:
        lines.append(f"noise        multiplier {s['noise_multiplier']:.4f} (noise std / clip norm)")
    if s.get("rho") is not None:
        lines.append(f"rho (zCDP)   {s['rho']:.4f}")
        lines.append(f"epsilon      {s['epsilon']:.3f} at delta={s['delta']:g} (epsilon_rdp {s['epsilon_rdp']:.3f})")
        if _amplified(s):
            lines.append("             rho ignores the amplification by sampling; epsilon includes it")
        if s.get("equivalent") is not None:
            lines.append("             (rho and epsilon above: this run as it ran)")
            lines.extend(_equivalent_lines(s["equivalent"]))
    else:
        lines.append("user-level   none (no DP strategy)" if s.get("example_level") else "privacy      none (no DP strategy)")
    example = s.get("example_level")
    if example:
        lines.append(
            f"example-level epsilon {example['epsilon']:.3f} at delta={example['delta']:g} "
            "(DP-SGD on each device: protects one example, not all of a device's data)"
        )
    audit = s.get("audit")
    if audit is not None:
        lo, hi = audit["ci"]
        lines.append(
            f"empirical    epsilon {audit['epsilon']:.3f} [{lo:.3f}, {hi:.3f}] ({audit['threat_model']}, "
            f"{audit['canaries']} canaries; fedsim audit RUN_DIR for the report)"
        )
    if s.get("rejected"):
        lines.append("rejected     " + ", ".join(f"{k}={v}" for k, v in s["rejected"].items()))
    wall = f"wall time    {s['wall_time_s']:.1f} s (the rounds)"
    if process_s is not None:
        wall += f"; {process_s:.1f} s since the process started (start-up, imports, data)"
    lines.append(wall)
    lines.append(f"run dir      {run_dir}")
    return "\n".join(lines)


def _amplified(s: dict) -> bool:
    """Whether the run's epsilon is below what its rho alone gives (privacy amplification by sampling)."""
    from fedsim.privacy.conversions import epsilon_rdp_from_rho

    try:
        return s["epsilon_rdp"] < epsilon_rdp_from_rho(s["rho"], s["delta"]) * (1 - 1e-9)
    except (KeyError, TypeError, ValueError):
        return False


def build_parser() -> argparse.ArgumentParser:
    """The ``fedsim`` argument parser with every subcommand."""
    parser = _Parser(prog="fedsim", description="Federated-learning simulation with formal differential privacy.")
    parser.add_argument("--version", action="version", version=f"fedsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(sub)
    from fedsim.privacy_cli import add_parser as _add_privacy

    _add_privacy(sub)
    _add_bench(sub)
    from fedsim.sweep import add_parser as _add_sweep

    _add_sweep(sub)
    _add_audit(sub)
    _add_check_strategy(sub)
    return parser


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="empirical privacy estimate of a finished run with canaries ([audit] canaries = N)",
        description="Recompute a finished run's one-shot empirical epsilon (Andrew et al., ICLR 2024) from "
        "its saved canary directions (RUN_DIR/secret/canaries.pt) and its released model, for both threat "
        "models, next to the formal epsilon (docs/audit.md).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written with [audit] canaries = N")
    p.add_argument(
        "--threat-model",
        choices=("final-model", "all-iterates"),
        help="the estimate reported first (default: the run's [audit] threat-model)",
    )
    p.add_argument("--bootstrap", type=int, default=200, metavar="B", help="bootstrap resamples for the interval (200)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    from fedsim.engine.canaries import audit_run, format_report

    if args.bootstrap < 0:
        raise FedsimError(f"--bootstrap: must be >= 0, got {args.bootstrap}")
    report = audit_run(args.run_dir, threat_model=args.threat_model, num_bootstrap=args.bootstrap)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def _add_check_strategy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-strategy",
        help="run the strategy contract suite on your own strategy",
        description="Run the contract suite every built-in strategy passes "
        "(tests/contracts/test_strategy_contract.py, needs a source checkout and pytest) on SPEC: 'path/file.py:Class' (relative to the working "
        "directory) or 'package.module:Class'. The strategy must be constructible with its defaults.",
    )
    p.add_argument("spec", metavar="SPEC", help="path/file.py:Class or package.module:Class")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="further pytest arguments (e.g. -x -v)")
    p.set_defaults(func=_cmd_check_strategy)


def _cmd_check_strategy(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from fedsim.registry import UnknownPluginError
    from fedsim.strategy import STRATEGIES, Strategy

    spec = args.spec
    target, sep, attr = spec.rpartition(":")
    if sep and target.endswith(".py"):
        spec = f"{Path(target).resolve()}:{attr}"
    try:
        cls = STRATEGIES.get(spec, base_dir=Path.cwd())
    except UnknownPluginError as exc:
        raise FedsimError(f"check-strategy: {exc}") from None
    except Exception as exc:  # the user's module failed to import or execute
        raise FedsimError(f"check-strategy: cannot load {args.spec!r}: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise FedsimError(f"check-strategy: {args.spec!r} is not a fedsim.strategy.Strategy subclass")
    suite = Path(__file__).resolve().parents[1] / "tests" / "contracts" / "test_strategy_contract.py"
    if not suite.is_file():
        raise FedsimError(f"check-strategy: the contract suite {suite} is missing (it ships with a source checkout)")
    env = dict(os.environ, FEDSIM_STRATEGY=spec)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite), *args.pytest_args]
    return subprocess.run(cmd, cwd=suite.parents[1], env=env).returncode


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from fedsim_bench import add_arguments

    p = sub.add_parser(
        "bench",
        help="benchmark client-training throughput (fedsim vs naive loop vs Flower vs pfl-research vs FLOP bound)",
        description="Measure fedsim's engine, a naive per-client loop, Flower's simulation engine, pfl-research "
        "(in its own environment) and the FLOP bound side by side on the reference scenarios, and the Gboard-scale "
        "DP-FTRL round of the word LSTM (see docs/benchmarks.md).",
    )
    add_arguments(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from fedsim_bench import run_from_args

    return run_from_args(args)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split("\n"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsim`` console script and ``python -m fedsim``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _show_note(shown)
    try:
        return int(args.func(args))
    except ScenarioError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except FedsimError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


def _show_note(shown: Any) -> Any:
    """``warnings.showwarning`` that prints a :class:`~fedsim.errors.ScenarioNote` as ``note: ...``."""

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, ScenarioNote):
            print(f"note: {message}", file=sys.stderr)
        else:
            shown(message, category, *args, **kwargs)

    return show


if __name__ == "__main__":
    sys.exit(main())
