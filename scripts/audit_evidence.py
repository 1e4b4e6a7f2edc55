"""Formal vs empirical epsilon: the evidence of docs/audit.md (table and docs/audit.png).

1. The pure Gaussian mechanism (canaries and noise, no training): the one-shot estimate against
   the mechanism's exact epsilon across noise multipliers.
2. The DP scenarios (``scenarios/dp_ftrl.toml``, ``scenarios/dp_fedavg.toml``; a Shakespeare
   scenario too when ``scenarios/shakespeare_*.toml`` exists) at 0.05x, 0.5x, 1x and 2x their
   noise multiplier, each with ``[audit] canaries = N`` in one run: the formal epsilon next to the
   empirical estimate under both threat models (one run gives both).

Usage::

    .venv/bin/python scripts/audit_evidence.py                 # ~10 minutes on 2 idle cores
    .venv/bin/python scripts/audit_evidence.py --canaries 100 --scales 1 --out runs/audit_quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedsim.engine import Simulation  # noqa: E402
from fedsim.engine.canaries import load_canaries  # noqa: E402
from fedsim.privacy.audit import cosines, estimate_epsilon, gaussian_mechanism_cosines  # noqa: E402
from fedsim.privacy.conversions import epsilon_from_rho  # noqa: E402
from fedsim.privacy.noise import NoiseKey, NoiseSource  # noqa: E402
from fedsim.scenario import load_scenario, parse_override  # noqa: E402

GAUSSIAN_Z = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
GAUSSIAN_DELTA = 1e-5


def gaussian_rows() -> list[dict]:
    rows = []
    for z in GAUSSIAN_Z:
        # a fresh secret key per point, as a real run draws its own
        ins, out = gaussian_mechanism_cosines(
            NoiseSource(NoiseKey.generate()), num_canaries=500, dim=20_000, noise_multiplier=z
        )
        est = estimate_epsilon(ins, out, dim=20_000, delta=GAUSSIAN_DELTA, num_bootstrap=300)
        rows.append(
            {
                "z": z,
                "exact": epsilon_from_rho(1 / (2 * z * z), GAUSSIAN_DELTA),
                "epsilon": est.epsilon,
                "ci": [est.ci_low, est.ci_high],
                "lower_bound": est.lower_bound,
            }
        )
        print(f"gaussian z={z:<5} exact {rows[-1]['exact']:.3f}  estimate {est.epsilon:.3f} "
              f"[{est.ci_low:.3f}, {est.ci_high:.3f}]  lower bound {est.lower_bound:.3f}", flush=True)
    return rows


def scenario_rows(paths: list[Path], scales: list[float], canaries: int, out: Path) -> list[dict]:
    rows = []
    for path in paths:
        base = load_scenario(path)
        z0 = base.strategy.params.get("noise_multiplier")
        # a scenario that solves its noise for a target rho runs once, at its own noise
        for scale in scales if z0 is not None else [None]:
            overrides = [parse_override(f"audit.canaries={canaries}")]
            if scale is not None:
                z = round(z0 * scale, 6)
                overrides.append(parse_override(f"strategy.noise-multiplier={z}"))
            run_dir = out / (f"{base.name}_z{z:g}" if scale is not None else base.name)
            overrides.append((["output-dir"], str(run_dir)))
            scenario = load_scenario(path, overrides)
            sim = Simulation(scenario, run_dir=run_dir, progress=False)
            if scale is None:
                z = round(float(sim.strategy.noise_multiplier), 4)
            result = sim.run()
            s = result.summary
            a = s["audit"]
            row = {
                "scenario": base.name,
                "z": z,
                "accuracy": s["accuracy"],
                "rho": s["rho"],
                "formal": s["epsilon"],
                "delta": s["delta"],
                "run_dir": str(run_dir),
            }
            for tm, est in a["estimates"].items():
                row[tm] = {"epsilon": est["epsilon"], "ci": [est["ci_low"], est["ci_high"]], "lower_bound": est["lower_bound"]}
            row["no_signal"] = no_signal_reference(run_dir, s["delta"])
            rows.append(row)
            fm, ai = row["final-model"], row["all-iterates"]
            print(
                f"{base.name:<10} z={z:<6g} formal {s['epsilon']:.3f}  final-model {fm['epsilon']:.3f} "
                f"[{fm['ci'][0]:.3f}, {fm['ci'][1]:.3f}]  all-iterates {ai['epsilon']:.3f} "
                f"[{ai['ci'][0]:.3f}, {ai['ci'][1]:.3f}]  acc {s['accuracy']:.3f}",
                flush=True,
            )
    return rows


def no_signal_reference(run_dir: Path, delta: float) -> float:
    """The final-model estimate when the "inserted" canaries are the never-inserted ones.

    What the estimator reports for a run that leaks nothing about its canaries at this number of
    canaries: its floor (the fitted sigma's sampling error alone gives a positive epsilon).
    """
    blob = load_canaries(run_dir)
    final = torch.load(run_dir / "model.pt", weights_only=False)["flat"]
    n = int(blob["count"])
    held = cosines(final - blob["initial"], blob["directions"][n:])
    return estimate_epsilon(held, held, dim=blob["directions"].shape[1], delta=delta, num_bootstrap=0).epsilon


def plot(gauss: list[dict], scen: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["scenario"] for r in scen}, key=[r["scenario"] for r in scen].index)
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.6 * (1 + len(names)), 3.8), constrained_layout=True)
    ax = axes[0]
    zs = [r["z"] for r in gauss]
    ax.plot(zs, [r["exact"] for r in gauss], "k-", label="exact epsilon")
    ax.errorbar(
        zs, [r["epsilon"] for r in gauss],
        yerr=[[r["epsilon"] - r["ci"][0] for r in gauss], [r["ci"][1] - r["epsilon"] for r in gauss]],
        fmt="o", capsize=3, label="one-shot estimate (95% CI)",
    )
    ax.plot(zs, [r["lower_bound"] for r in gauss], "v", color="C2", label="threshold-test lower bound")
    _log_ticks(ax, zs)
    ax.set_ylabel(f"epsilon (delta = {GAUSSIAN_DELTA:g})")
    ax.set_title("Gaussian mechanism, 500 canaries, d = 20000", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for ax, name in zip(axes[1:], names, strict=True):
        rows = [r for r in scen if r["scenario"] == name]
        zs = [r["z"] for r in rows]
        ax.plot(zs, [r["formal"] for r in rows], "k-o", label="formal epsilon")
        for i, (tm, color) in enumerate((("final-model", "C0"), ("all-iterates", "C1"))):
            shift = 1.0 + 0.04 * (2 * i - 1)
            ax.errorbar(
                [z * shift for z in zs], [r[tm]["epsilon"] for r in rows],
                yerr=[[r[tm]["epsilon"] - r[tm]["ci"][0] for r in rows], [r[tm]["ci"][1] - r[tm]["epsilon"] for r in rows]],
                fmt="s", color=color, capsize=3, label=f"empirical, {tm}",
            )
        ax.plot(zs, [r["no_signal"] for r in rows], "x", color="C7", label="no-signal reference (floor)")
        ax.set_yscale("symlog", linthresh=10)
        _log_ticks(ax, zs)
        ax.set_ylabel(f"epsilon (delta = {rows[0]['delta']:g})")
        ax.set_title(f"{name}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_ticks(ax, zs: list[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(zs)
    ax.set_xticklabels([f"{z:g}" for z in zs])
    ax.minorticks_off()
    ax.set_xlabel("noise multiplier z")


def table(scen: list[dict]) -> str:
    lines = [
        "| scenario | z | accuracy | rho (zCDP) | formal epsilon | empirical, final-model (95% CI) "
        "| empirical, all-iterates (95% CI) | no-signal reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in scen:
        cells = [f"{r[tm]['epsilon']:.2f} [{r[tm]['ci'][0]:.2f}, {r[tm]['ci'][1]:.2f}]" for tm in ("final-model", "all-iterates")]
        lines.append(
            f"| {r['scenario']} | {r['z']:g} | {r['accuracy']:.3f} | {r['rho']:.3g} | {r['formal']:.2f} | {cells[0]} "
            f"| {cells[1]} | {r['no_signal']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--canaries", type=int, default=200, help="canaries per run (200)")
    p.add_argument("--scales", default="0.05,0.5,1,2", help="noise-multiplier scales of each scenario (0.05,0.5,1,2)")
    p.add_argument("--out", default="runs/audit_evidence", help="run directories (runs/audit_evidence)")
    p.add_argument("--plot", default=str(ROOT / "docs" / "audit.png"), help="figure (docs/audit.png)")
    p.add_argument("--scenarios", default="", help="comma-separated scenario files (default: the DP scenarios)")
    args = p.parse_args(argv)
    scales = [float(x) for x in args.scales.split(",")]
    if args.scenarios:
        paths = [Path(p) for p in args.scenarios.split(",")]
    else:
        paths = [ROOT / "scenarios" / "dp_ftrl.toml", ROOT / "scenarios" / "dp_fedavg.toml"]
        paths += [p for p in [ROOT / "scenarios" / "shakespeare_dp_ftrl.toml"] if p.exists()]
    gauss = gaussian_rows()
    scen = scenario_rows(paths, scales, args.canaries, Path(args.out))
    plot(gauss, scen, Path(args.plot))
    print()
    print(table(scen))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "evidence.json").write_text(json.dumps({"gaussian": gauss, "scenarios": scen}, indent=2) + "\n")
    print(f"\nwrote {args.plot} and {Path(args.out) / 'evidence.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
