"""``fedsim sweep``: grids of runs for privacy-utility studies.

::

    fedsim sweep scenarios/shakespeare_dp_ftrl.toml \\
        --grid strategy.name=fedavg,dp-fedavg,dp-ftrl --grid strategy.target-rho=0.81,2.63 \\
        --seeds 3 --out runs/sweep [--workers 2] [--set rounds=50] [--backend ray --ray-address auto]

Every combination of the ``--grid`` values (a *configuration*) runs once per seed, each as a normal
run directory ``OUT/<configuration>/seed-<s>``; seeds are ``scenario seed + 0 .. N-1``. Runs go to
worker processes on this machine (``--workers``, default: one per CPU, at most one per run) or to
Ray tasks (``--backend ray``; ``--ray-address`` names a running cluster, default a local one). A
run directory that already holds a ``summary.json`` for the same resolved scenario is complete and
is skipped, so an interrupted sweep continues where it stopped when started again.

Strategy parameters follow the configuration's strategy: a ``[strategy]`` key of the scenario or
of the grid that the configuration's strategy does not take (``target-rho`` for ``fedavg``) is left
out of that configuration, and configurations that become identical run once. A grid value of
``strategy.noise-multiplier`` replaces the scenario's ``target-rho`` and vice versa. A grid key
that no configuration takes, or any other invalid value, fails before any run starts. From Python,
:func:`plan_sweep` also takes explicit :class:`Configuration` lists (``scripts/compare_dp.py``),
where an override ``"strategy": {...}`` replaces the whole section.

The sweep directory gets

* ``runs.csv``: one row per run (grid values, seed, final ``accuracy``, ``loss``, ``rounds``,
  ``rho``, ``epsilon``, ``delta``, ``noise_multiplier``, ``wall_time_s``, run directory);
* ``results.csv`` and ``results.md``: one row per configuration, mean and sample standard
  deviation over seeds of accuracy, loss and wall time, with its ``rho`` and ``epsilon``;
* ``accuracy_vs_round.png`` (mean test accuracy per round of every configuration, the band one
  standard deviation) and ``accuracy_vs_rho.png`` (final accuracy against the run's ``rho``, one
  line per method: configurations that differ only in the privacy level, :data:`RHO_KEYS`);
  legends name configurations readably (``dp-ftrl, target-rho 0.81``).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import tomllib
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.errors import FedsimError, ScenarioError, ScenarioNote
from fedsim.validation import is_int

__all__ = [
    "Configuration",
    "RunSpec",
    "SweepResult",
    "expand_grid",
    "method_groups",
    "parse_grid",
    "plan_sweep",
    "readable_label",
    "run_sweep",
    "sweep_figures",
]

#: Files a finished run directory holds that the sweep copies back from a Ray task.
_RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "ledger.json", "model.pt", "metrics.png")


class SweepError(FedsimError):
    """Bad sweep input (a grid flag, seeds, workers): one line, exit 2."""


# --------------------------------------------------------------------------------------------
# grids and configurations


def parse_grid(text: str) -> tuple[str, list[Any]]:
    """``key=v1,v2,...`` -> ``(key, [v1, v2, ...])``; each value is read as TOML, else a string."""
    if "=" not in text:
        raise SweepError(f"--grid expects key=v1,v2,..., got {text!r}")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise SweepError(f"--grid expects a dotted key like strategy.target-rho, got {key!r}")
    values = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            raise SweepError(f"--grid {key}: empty value in {raw!r}")
        try:
            value = tomllib.loads(f"v = {item}")["v"]
        except tomllib.TOMLDecodeError:
            value = item
        values.append(value)
    if len(set(map(repr, values))) != len(values):
        raise SweepError(f"--grid {key}: repeated value in {raw!r}")
    return key, values


def expand_grid(grid: Sequence[tuple[str, Sequence[Any]]]) -> list[dict[str, Any]]:
    """Every combination of the grid values, in order (the last key varies fastest)."""
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise SweepError(f"--grid {dup}: given twice")
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in grid))]


@dataclass(frozen=True)
class Configuration:
    """One point of a sweep: a label, dotted overrides of the base scenario, and a directory name.

    ``method`` names the method the configuration runs (``--config "DP-FTRL (tree): ..."``): tables
    and plots show it instead of the overrides, and the rho plot draws a method's configurations
    as one line. Empty: the method is told by the overrides (:func:`method_groups`).
    """

    label: str
    overrides: dict[str, Any]
    name: str = ""
    method: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", _slug(self.overrides) if self.overrides else "base")


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    """``"LABEL: key=value, key=value"`` -> ``(LABEL, {key: value, ...})`` (``--config``).

    Values are read as TOML, else as strings; ``LABEL:`` alone is the base scenario under that name.
    """
    label, sep, rest = text.partition(":")
    label = label.strip()
    if not sep or not label:
        raise SweepError(f"--config expects 'LABEL: key=value, ...', got {text!r}")
    overrides: dict[str, Any] = {}
    for item in re.split(r",\s*(?=[A-Za-z][\w.-]*\s*=)", rest.strip()) if rest.strip() else []:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key or any(not part for part in key.split(".")):
            raise SweepError(f"--config {label}: expects key=value, got {item.strip()!r}")
        if key in overrides:
            raise SweepError(f"--config {label}: {key} given twice")
        try:
            overrides[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = raw.strip()
    return label, overrides


def method_slug(label: str) -> str:
    """A directory name for a method label: ``"DP-FTRL (tree)"`` -> ``"dp-ftrl-tree"``."""
    return re.sub(r"[^a-z0-9.+]+", "-", label.lower()).strip("-") or "method"


def combine(methods: Sequence[tuple[str, dict[str, Any]]], grid: Sequence[dict[str, Any]]) -> list[Configuration]:
    """Every method (``--config``) crossed with every grid point (``--grid``): the method's
    overrides, then the grid's; labelled by the method (and the grid values)."""
    labels = [m for m, _ in methods]
    if len(set(labels)) != len(labels):
        raise SweepError(f"--config {next(m for m in labels if labels.count(m) > 1)}: label given twice")
    slugs = [method_slug(m) for m in labels]
    if len(set(slugs)) != len(slugs):
        raise SweepError("--config: two labels give the same directory name; choose more distinct labels")
    out = []
    for (label, overrides), slug in zip(methods, slugs, strict=True):
        for point in grid or [{}]:
            clash = sorted(set(overrides) & set(point))
            if clash:
                raise SweepError(f"--config {label}: {clash[0]} is also a --grid key")
            name = slug if not point else f"{slug}__{_slug(point)}"
            shown = f"{label}, {readable_label(point)}" if point else label
            out.append(Configuration(shown, {**overrides, **point}, name, method=label))
    return out


def _fmt_value(value: Any) -> str:
    if isinstance(value, str):
        tail = value.rpartition(":")[2] if ":" in value else value
        return Path(tail).name or tail
    return f"{value:g}" if isinstance(value, float) else str(value)


def _slug(overrides: dict[str, Any]) -> str:
    text = "__".join(f"{k}={_fmt_value(v)}" for k, v in overrides.items())
    text = re.sub(r"[^A-Za-z0-9._=+-]", "_", text)
    if len(text) > 120:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        text = f"{text[:110]}-{digest}"
    return text


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: the configuration, its seed, resolved scenario and run directory."""

    config: Configuration
    seed: int
    raw: dict[str, Any]
    source: str
    run_dir: Path
    noise_multiplier: float | None


@dataclass
class SweepResult:
    """What a sweep produced: one summary per run (``None`` for a run that failed)."""

    out: Path
    specs: list[RunSpec]
    summaries: dict[Path, dict[str, Any] | None] = field(default_factory=dict)
    skipped: int = 0
    wall_time_s: float = 0.0
    #: a run's accuracy and loss: the mean of its last ``last_evals`` evaluations (1: the final one)
    last_evals: int = 1

    @property
    def failed(self) -> list[RunSpec]:
        return [s for s in self.specs if self.summaries.get(s.run_dir) is None]


def _load_raw(path: Path) -> dict[str, Any]:
    from fedsim.scenario import load_scenario

    load_scenario(path)  # the base scenario itself must be valid
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _resolve(
    raw: dict[str, Any], overrides: dict[str, Any], source: Path, used: set[str], dropped: dict[str, set[str]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Apply a configuration's overrides; drop strategy parameters its strategy does not take.

    Returns the scenario dict and the overrides that apply (what identifies the configuration).
    ``used`` collects the grid keys that this configuration took, ``dropped`` the parameters left
    out per strategy name (:func:`fedsim.scenario.replace_strategy_params`, as ``--set`` does).
    """
    import copy

    from fedsim.scenario import replace_strategy_params

    out = copy.deepcopy(raw)
    applied: dict[str, Any] = {}
    strategy = dict(out.get("strategy", {}))
    given: dict[str, Any] = {}
    for key, value in overrides.items():
        path = key.split(".")
        if key == "strategy" and isinstance(value, dict):
            strategy = dict(value)  # a whole [strategy] section replaces the scenario's
            applied[key] = value
            used.add(key)
            continue
        if path[0] == "strategy" and len(path) == 2:
            given[path[1]] = value
            continue
        table = out
        for part in path[:-1]:
            nxt = table.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise SweepError(f"--grid {key}: {part!r} is not a table")
            table = nxt
        table[path[-1]] = value
        applied[key] = value
        used.add(key)
    # a grid crosses strategies with their parameters: a value its strategy does not take is left out
    strategy, left_out = replace_strategy_params(strategy, given, source.parent, drop_given=True)
    if left_out:
        dropped.setdefault(str(strategy.get("name", "fedavg")), set()).update(left_out)
    for key in overrides:
        path = key.split(".")
        if path[0] == "strategy" and len(path) == 2 and path[1] in strategy:
            applied[key] = strategy[path[1]]
            used.add(key)
    out["strategy"] = strategy
    return out, applied


def plan_sweep(
    scenario: str | Path,
    configurations: Sequence[Configuration],
    *,
    seeds: int,
    out: str | Path,
    overrides: Sequence[tuple[list[str], Any]] = (),
    check_grid_keys: Iterable[str] = (),
) -> list[RunSpec]:
    """Validate every run of a sweep before any starts; return them in order.

    Raises
    ------
    ScenarioError, SweepError
        Naming the configuration and key, when a run's scenario is invalid, or a key of
        ``check_grid_keys`` applies to no configuration.
    """
    from fedsim.scenario import scenario_from_dict

    if not is_int(seeds) or seeds < 1:
        raise SweepError(f"--seeds must be an integer >= 1, got {seeds!r}")
    path = Path(scenario)
    raw = _load_raw(path)
    base = scenario_from_dict(raw, source=str(path), overrides=list(overrides))
    raw = base.to_dict()
    out = Path(out)
    used: set[str] = set()
    dropped: dict[str, set[str]] = {}
    specs: list[RunSpec] = []
    seen: dict[str, Configuration] = {}
    for config in configurations:
        resolved, applied = _resolve(raw, config.overrides, path, used, dropped)
        fingerprint = json.dumps(applied, sort_keys=True, default=str)
        if fingerprint in seen:
            continue  # identical to an earlier configuration once inapplicable keys are dropped
        effective = Configuration(
            config.label if config.label != _label(config.overrides) else _label(applied),
            applied,
            config.name if config.name != _slug(config.overrides) else (_slug(applied) if applied else "base"),
            method=config.method,
        )
        seen[fingerprint] = effective
        for i in range(seeds):
            seed = base.seed + i
            run_raw = dict(resolved, seed=seed)
            run_dir = out / effective.name / f"seed-{seed}"
            run_raw["output-dir"] = str(run_dir)
            try:
                sc = scenario_from_dict(run_raw, source=str(path))
            except ScenarioError as exc:
                from_grid = exc.key is not None and any(
                    k == exc.key or k.startswith(f"{exc.key}.") for k in effective.overrides
                )
                if from_grid:
                    where = f" (configuration {effective.label})" if exc.key not in effective.overrides else ""
                    raise ScenarioError(f"{exc.message}{where}", key=exc.key, source="--grid") from None
                where = f" (configuration {effective.label})" if effective.overrides else ""
                raise ScenarioError(f"{exc.message}{where}", key=exc.key, source=str(path)) from None
            specs.append(
                RunSpec(effective, seed, sc.to_dict(), str(path), run_dir, _noise_multiplier(sc))
            )
    for key in check_grid_keys:
        if key not in used:
            raise SweepError(
                f"--grid {key}: unknown key: no configuration's scenario or strategy takes it"
            )
    if dropped:
        which = "; ".join(
            f"{name}: {', '.join(f'strategy.{k}' for k in sorted(keys))}" for name, keys in sorted(dropped.items())
        )
        warnings.warn(
            ScenarioNote(f"strategy parameters left out of the configurations whose strategy does not take them: {which}"),
            stacklevel=2,
        )
    return specs


def _label(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in overrides.items()) or "base"


def _noise_multiplier(scenario: Any) -> float | None:
    """The noise multiplier the run will use (calibrated from ``target-rho`` where given)."""
    from fedsim.builders import build_strategy

    strategy = build_strategy(scenario)
    try:
        z = strategy.calibrated_noise_multiplier(num_rounds=scenario.rounds)
    except ValueError as exc:
        raise ScenarioError(str(exc), key="strategy", source=scenario.source) from None
    return None if z is None else float(z)


# --------------------------------------------------------------------------------------------
# running


def _is_complete(spec: RunSpec) -> bool:
    summary = spec.run_dir / "summary.json"
    config = spec.run_dir / "config.toml"
    if not (summary.is_file() and config.is_file()):
        return False
    try:
        recorded = tomllib.loads(config.read_text(encoding="utf-8"))
        json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # the same resolved scenario; where the run directory lives (output-dir) does not matter, so
    # a sweep directory that was moved or assembled from several machines is still complete; nor
    # does the run id a run drew for itself where the sweep set none
    if "run-id" not in spec.raw.get("privacy", {}) and "run-id" in recorded.get("privacy", {}):
        recorded["privacy"] = {k: v for k, v in recorded["privacy"].items() if k != "run-id"}
    return _without_output_dir(recorded) == _without_output_dir(spec.raw)


def _without_output_dir(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k != "output-dir"}


def run_one(raw: dict[str, Any], source: str, run_dir: str) -> dict[str, Any]:
    """Run one scenario dict into ``run_dir``; return its summary (worker entry point)."""
    from fedsim.engine.simulation import Simulation
    from fedsim.scenario import scenario_from_dict

    scenario = scenario_from_dict(raw, source=source)
    shutil.rmtree(run_dir, ignore_errors=True)  # an incomplete earlier attempt starts afresh
    return Simulation(scenario, run_dir=run_dir, progress=False).run().summary


def run_one_returning_files(raw: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Ray task: run in a temporary directory on the worker node and return the run's files."""
    with tempfile.TemporaryDirectory(prefix="fedsim-sweep-") as tmp:
        run_dir = Path(tmp) / "run"
        raw = dict(raw, **{"output-dir": str(run_dir)})
        summary = run_one(raw, source, str(run_dir))
        files = {n: (run_dir / n).read_bytes() for n in _RUN_FILES if (run_dir / n).is_file()}
        # [log] tensorboard: the event files come back too (an MLflow file store does not: its
        # records name the worker's paths; name an MLflow server with [log] mlflow-uri instead)
        files.update({p.name: p.read_bytes() for p in run_dir.glob("events.out.tfevents.*") if p.is_file()})
    return summary, files


def _default_workers(n_runs: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, n_runs))


def run_sweep(
    specs: Sequence[RunSpec],
    out: str | Path,
    *,
    workers: int | None = None,
    backend: str = "processes",
    ray_address: str = "",
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    last_evals: int = 1,
) -> SweepResult:
    """Run every incomplete run of ``specs`` and write the sweep's results files and plots
    (``last_evals``: a run's accuracy and loss are the mean of its last that many evaluations)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = SweepResult(out, list(specs), last_evals=last_evals)
    todo = []
    for spec in specs:
        if _is_complete(spec):
            result.summaries[spec.run_dir] = json.loads((spec.run_dir / "summary.json").read_text(encoding="utf-8"))
            result.skipped += 1
        else:
            todo.append(spec)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(specs), initial=result.skipped, desc="sweep", unit="run", dynamic_ncols=True)
    say = echo or (bar.write if bar is not None else (lambda s: print(s, file=sys.stderr)))
    if result.skipped:
        say(f"{result.skipped} of {len(specs)} runs already complete in {out}: skipped")

    def finished(spec: RunSpec, summary: dict[str, Any] | None, error: str | None = None) -> None:
        result.summaries[spec.run_dir] = summary
        if bar is not None:
            bar.update(1)
        say(_run_line(spec, summary, error))

    try:
        if todo and backend == "ray":
            _run_ray(todo, ray_address, finished)
        elif todo:
            n = workers or _default_workers(len(todo))
            if n == 1:
                for spec in todo:
                    try:
                        finished(spec, run_one(spec.raw, spec.source, str(spec.run_dir)))
                    except Exception as exc:  # one failed run does not stop the sweep
                        finished(spec, None, f"{type(exc).__name__}: {exc}")
            else:
                _run_processes(todo, n, finished)
    finally:
        if bar is not None:
            bar.close()
    result.wall_time_s = time.perf_counter() - start
    write_results(result)
    return result


def _run_processes(todo: Sequence[RunSpec], workers: int, finished: Callable[..., None]) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: dict[Future, RunSpec] = {
            pool.submit(run_one, spec.raw, spec.source, str(spec.run_dir)): spec for spec in todo
        }
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                spec = pending.pop(fut)
                exc = fut.exception()
                if exc is None:
                    finished(spec, fut.result())
                else:
                    finished(spec, None, f"{type(exc).__name__}: {exc}")


def _run_ray(todo: Sequence[RunSpec], address: str, finished: Callable[..., None]) -> None:
    try:
        import ray
    except ImportError:
        raise SweepError("--backend ray needs the ray package (pip install 'ray[default]')") from None
    from fedsim.engine.ray_backend import check_reachable

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            check_reachable(address)
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise SweepError(f"--ray-address: cannot start or reach {address or 'a local Ray'}: {exc}") from None
        started = True
    task = ray.remote(num_cpus=1)(run_one_returning_files)
    try:
        pending = {task.remote(spec.raw, spec.source): spec for spec in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                spec = pending.pop(ref)
                try:
                    summary, files = ray.get(ref)
                except Exception as exc:
                    finished(spec, None, f"{type(exc).__name__}: {exc}")
                    continue
                shutil.rmtree(spec.run_dir, ignore_errors=True)
                spec.run_dir.mkdir(parents=True, exist_ok=True)
                for name, data in files.items():
                    (spec.run_dir / name).write_bytes(data)
                finished(spec, summary)
    finally:
        if started:
            ray.shutdown()


def _run_line(spec: RunSpec, s: dict[str, Any] | None, error: str | None) -> str:
    head = f"{spec.config.label} seed={spec.seed}"
    if s is None:
        return f"FAILED {head}: {error}"
    parts = [f"accuracy {s['accuracy']:.4f}", f"loss {s['loss']:.4f}"]
    if s.get("rho") is not None:
        parts.append(f"rho {s['rho']:.4g}")
        parts.append(f"epsilon {s['epsilon']:.4g}")
    parts.append(f"{s['wall_time_s']:.1f} s")
    return f"done   {head}: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------
# results


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def run_metrics(result: SweepResult, spec: RunSpec) -> dict[str, float | None]:
    """A finished run's ``accuracy`` and ``loss``: its summary's, or with ``result.last_evals > 1``
    the mean of its last that many evaluations in ``metrics.jsonl`` (top-1 accuracy of a language
    model swings between rounds; a mean of the last few evaluations compares methods better)."""
    s = result.summaries.get(spec.run_dir) or {}
    if result.last_evals <= 1:
        return {"accuracy": s.get("accuracy"), "loss": s.get("loss")}
    path = spec.run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    evals = [r for r in rows if r.get("accuracy") is not None][-result.last_evals:]
    out: dict[str, float | None] = {}
    for key in ("accuracy", "loss"):
        vals = [float(r[key]) for r in evals if r.get(key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    return out


def configuration_rows(result: SweepResult) -> list[dict[str, Any]]:
    """One aggregated row per configuration (in sweep order)."""
    rows = []
    by_config: dict[str, list[RunSpec]] = {}
    for spec in result.specs:
        by_config.setdefault(spec.config.name, []).append(spec)
    for specs in by_config.values():
        config = specs[0].config
        sums = [result.summaries.get(s.run_dir) for s in specs]
        ok = [s for s in sums if s is not None]
        measured = [run_metrics(result, s) for s in specs if result.summaries.get(s.run_dir) is not None]
        row: dict[str, Any] = {"configuration": config.label, "name": config.name, **config.overrides}
        if config.method:
            row["method"] = config.method
        for key in ("accuracy", "loss"):
            row[f"{key}_mean"], row[f"{key}_sd"] = _mean_sd([m[key] for m in measured])
        row["wall_time_s_mean"], row["wall_time_s_sd"] = _mean_sd([s["wall_time_s"] for s in ok])
        for key in ("rho", "epsilon", "delta", "equivalent_rho", "equivalent_epsilon"):
            vals = [s.get(key) for s in ok if s.get(key) is not None]
            row[key] = max(vals) if vals else None
        eq = next((s["equivalent"] for s in ok if s.get("equivalent")), None)
        row["equivalent_cohort"] = None if eq is None else eq["cohort"]
        row["equivalent_noise_multiplier"] = None if eq is None else eq["noise_multiplier"]
        row["equivalent_min_population"] = None if eq is None else eq["min_population"]
        row["rounds"] = min((s["rounds"] for s in ok), default=None)
        row["noise_multiplier"] = next((s["noise_multiplier"] for s in ok if s.get("noise_multiplier") is not None),
                                       specs[0].noise_multiplier)
        inits = [s["init"] for s in ok if isinstance(s.get("init"), dict) and s["init"].get("accuracy") is not None]
        row["init_accuracy"] = inits[0]["accuracy"] if inits else None
        row["init_loss"] = inits[0]["loss"] if inits else None
        row["seeds"] = len(ok)
        row["failed"] = len(sums) - len(ok)
        rows.append(row)
    return rows


def run_rows(result: SweepResult) -> list[dict[str, Any]]:
    """One row per run."""
    rows = []
    for spec in result.specs:
        s = result.summaries.get(spec.run_dir) or {}
        rows.append(
            {
                "configuration": spec.config.label,
                **spec.config.overrides,
                "seed": spec.seed,
                **{k: s.get(k) for k in ("accuracy", "loss", "rounds", "rho", "epsilon", "delta")},
                **({f"{k}_last{result.last_evals}": v for k, v in run_metrics(result, spec).items()}
                   if result.last_evals > 1 and s else {}),
                **{k: s.get(k) for k in ("equivalent_rho", "equivalent_epsilon") if s.get(k) is not None},
                "noise_multiplier": s.get("noise_multiplier", spec.noise_multiplier),
                "run_id": s.get("run_id"),
                "wall_time_s": s.get("wall_time_s"),
                "run_dir": str(spec.run_dir),
            }
        )
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def results_markdown(result: SweepResult) -> str:
    """The ``results.md`` table: one row per configuration.

    With ``[privacy] equivalent-cohort`` in any run, two more columns give the deployment's
    guarantee (``equivalent rho``, ``equivalent epsilon``) beside the run's own; with a warm start
    (``[model] init``), a first row gives the starting model's own accuracy and loss.
    """
    rows = configuration_rows(result)
    seeds = max((r["seeds"] for r in rows), default=0)
    equivalent = any(r["equivalent_rho"] is not None for r in rows)
    what = "accuracy" if result.last_evals <= 1 else f"accuracy (mean of the last {result.last_evals} evaluations)"
    head = (f"| configuration | noise multiplier | {what}, mean ± sd over {seeds} seed{'s' if seeds != 1 else ''} "
            "| loss | rho (zCDP) of the run | epsilon of the run |")
    if equivalent:
        head += " deployment-equivalent rho | deployment-equivalent epsilon |"
    head += " wall time per run (s) |"
    lines = [head, "|" + "---|" * head.count(" |")]
    init = next((r for r in rows if r["init_accuracy"] is not None), None)
    if init is not None:
        blanks = " - | - |" + (" - | - |" if equivalent else "")
        lines.append(f"| starting model ([model] init), before any round | - | {init['init_accuracy']:.4f} "
                     f"| {_num(init['init_loss'])} |{blanks} - |")
    for r in rows:
        acc = "-" if r["accuracy_mean"] is None else f"{r['accuracy_mean']:.4f}"
        if r["accuracy_sd"] is not None:
            acc += f" ± {r['accuracy_sd']:.4f}"
        if r["failed"]:
            acc += f" ({r['failed']} failed)"
        eps = _num(r["epsilon"], 4)
        if r["epsilon"] is not None and r["delta"] is not None:
            eps += f" (delta = {r['delta']:g})"
        z = _num(r["noise_multiplier"])
        if r["equivalent_noise_multiplier"] is not None:
            z = f"{r['equivalent_noise_multiplier']:.4g} for {r['equivalent_cohort']:,} clients ({z} here)"
        line = f"| {r['configuration']} | {z} | {acc} | {_num(r['loss_mean'])} | {_num(r['rho'])} | {eps} |"
        if equivalent:
            line += f" {_num(r['equivalent_rho'])} | {_num(r['equivalent_epsilon'])} |"
        lines.append(line + f" {_num(r['wall_time_s_mean'], 3)} |")
    return "\n".join(lines) + "\n"


def write_results(result: SweepResult) -> None:
    """``runs.csv``, ``results.csv``, ``results.md`` and the two plots in the sweep directory."""
    out = result.out
    _write_csv(out / "runs.csv", run_rows(result))
    _write_csv(out / "results.csv", configuration_rows(result))
    (out / "results.md").write_text(results_markdown(result), encoding="utf-8")
    plot_results(result)


def _curves(result: SweepResult) -> dict[str, list[list[tuple[int, float]]]]:
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    for spec in result.specs:
        if result.summaries.get(spec.run_dir) is None:
            continue
        path = spec.run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        pts = [(r["round"], r["accuracy"]) for r in rows if r.get("accuracy") is not None]
        curves.setdefault(spec.config.name, []).append(pts)
    return curves


#: Keys that set a configuration's privacy level: ``accuracy_vs_rho.png`` draws the configurations
#: that differ only in these as one line across rho.
RHO_KEYS = ("strategy.target-rho", "strategy.noise-multiplier", "privacy.max-rho", "privacy.max-epsilon")


def readable_label(overrides: dict[str, Any]) -> str:
    """A legend label for a configuration: ``dp-ftrl, target-rho 0.81`` for
    ``strategy.name=dp-ftrl, strategy.target-rho=0.81`` (the strategy by its name, other keys by
    their last part), ``base`` without overrides."""
    parts = []
    for key, value in overrides.items():
        if key == "strategy.name":
            parts.insert(0, _fmt_value(value))
        elif key == "strategy" and isinstance(value, dict):
            parts.insert(0, _fmt_value(value.get("name", "fedavg")))
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]} {_fmt_value(value)}")
    return ", ".join(parts) or "base"


def method_groups(rows: list[dict[str, Any]], configs: dict[str, Configuration]) -> dict[str, list[dict[str, Any]]]:
    """Configuration rows grouped by method: the overrides other than :data:`RHO_KEYS` (readable
    label -> rows, in sweep order)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        config = configs[row["name"]]
        if config.method:  # a named method (--config): its grid points are one line
            groups.setdefault(config.method, []).append(row)
            continue
        method = {k: v for k, v in config.overrides.items() if k not in RHO_KEYS}
        groups.setdefault(readable_label(method), []).append(row)
    return groups


def display_label(config: Configuration) -> str:
    """A configuration's legend label: its label under a named method, else :func:`readable_label`."""
    return config.label if config.method else readable_label(config.overrides)


def _plain_log_ticks(ax: Any, values: list[float]) -> None:
    """Log-scale x ticks that read as plain numbers: at the values themselves when few, else
    ``0.5, 1, 2`` style labels (no ``10^0`` or ``2x10^0``)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    distinct = sorted(set(values))
    if 0 < len(distinct) <= 8:
        ax.set_xticks(distinct)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())


def plot_results(result: SweepResult) -> None:
    """Write ``accuracy_vs_round.png`` and ``accuracy_vs_rho.png`` (:func:`sweep_figures`)."""
    import matplotlib.pyplot as plt

    for name, fig in zip(("accuracy_vs_round.png", "accuracy_vs_rho.png"), sweep_figures(result), strict=True):
        fig.savefig(result.out / name, dpi=110)
        plt.close(fig)


def sweep_figures(result: SweepResult) -> tuple[Any, Any]:
    """The figures of ``accuracy_vs_round.png`` and ``accuracy_vs_rho.png``.

    ``accuracy_vs_rho.png`` has one line per method across rho: the configurations that differ
    only in :data:`RHO_KEYS` (the grid's ``strategy.target-rho``, say) are one method, drawn at
    each run's final ``rho`` with the mean accuracy and a one-sd bar; a method without DP is a
    dashed horizontal line. Legends use :func:`readable_label`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    configs = {s.config.name: s.config for s in result.specs}
    fig, ax = plt.subplots(figsize=(7.5, 4.6), constrained_layout=True)
    for i, (name, runs) in enumerate(_curves(result).items()):
        common = sorted(set.intersection(*(set(r for r, _ in pts) for pts in runs))) if runs else []
        if not common:
            continue
        ys = np.array([[dict(pts)[r] for r in common] for pts in runs], dtype=float)
        mean = ys.mean(axis=0)
        ax.plot(common, mean, label=display_label(configs[name]), color=f"C{i % 10}", lw=1.3,
                marker="o" if len(common) <= 12 else None, markersize=4)
        if len(runs) > 1:
            sd = ys.std(axis=0, ddof=1)
            ax.fill_between(common, mean - sd, mean + sd, color=f"C{i % 10}", alpha=0.15, lw=0)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    if ax.lines:
        from matplotlib.ticker import MaxNLocator

        last = max(x for line in ax.lines for x in line.get_xdata())
        ax.set_xlim(0, last + max(0.5, 0.02 * last))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="best")
    ax.set_title("test accuracy per round (mean over seeds, band: ± 1 sd)")
    by_round = fig

    fig, ax = plt.subplots(figsize=(6.5, 4.4), constrained_layout=True)
    rows = [r for r in configuration_rows(result) if r["accuracy_mean"] is not None]
    # [privacy] equivalent-cohort: DP runs stand at the deployment's rho, never at the run's own
    equivalent = [r for r in rows if r["equivalent_rho"] is not None]
    x_key = "equivalent_rho" if equivalent else "rho"
    rhos: list[float] = []
    for i, (label, group) in enumerate(method_groups(rows, configs).items()):
        color = f"C{i % 10}"
        private = sorted((r for r in group if r[x_key] is not None), key=lambda r: r[x_key])
        for r in group:
            if r["rho"] is None or (equivalent and r["equivalent_rho"] is None):
                ax.axhline(r["accuracy_mean"], ls="--", color=color, lw=1,
                           label=f"{label} (no DP)" if r["rho"] is None else f"{label} (no deployment rho)")
                if r["accuracy_sd"]:
                    ax.axhspan(r["accuracy_mean"] - r["accuracy_sd"], r["accuracy_mean"] + r["accuracy_sd"],
                               color=color, alpha=0.1, lw=0)
        if private:
            xs = [r[x_key] for r in private]
            ys = np.array([r["accuracy_mean"] for r in private])
            sd = np.array([r["accuracy_sd"] or 0.0 for r in private])
            ax.plot(xs, ys, "-o", color=color, markersize=4, lw=1.2, label=label)
            if sd.any():
                ax.fill_between(xs, ys - sd, ys + sd, color=color, alpha=0.15, lw=0)
            rhos += xs
    init = next((r for r in rows if r["init_accuracy"] is not None), None)
    if init is not None:
        ax.axhline(init["init_accuracy"], ls=":", color="0.3", lw=1.2, label="starting model (before any round)")
    if rhos:
        lo, hi = min(rhos), max(rhos)
        if hi > 20 * lo:  # a wide range: log scale, ticks labelled as plain numbers
            ax.set_xscale("log")
            ax.set_xlim(lo / 1.25, hi * 1.25)
            _plain_log_ticks(ax, rhos)
        else:
            from matplotlib.ticker import FuncFormatter

            pad = 0.05 * (hi - lo) or 0.1 * hi
            ax.set_xlim(max(0.0, lo - pad), hi + pad)
            ax.set_xticks(sorted(set(rhos)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if equivalent:
        cohorts = sorted({r["equivalent_cohort"] for r in equivalent})
        ax.set_xlabel(f"deployment-equivalent rho (zCDP) for {', '.join(f'{c:,}' for c in cohorts)} clients per "
                      "round\n(a statement about that configuration; each run's own rho is far larger)")
    else:
        ax.set_xlabel("rho (zCDP) of the run")
    what = "final test accuracy" if result.last_evals <= 1 else f"test accuracy (mean of last {result.last_evals} evaluations)"
    seeds = max((r["seeds"] for r in rows), default=0)
    ax.set_ylabel(what)
    ax.grid(alpha=0.3)
    if ax.lines or ax.collections:
        ax.legend(fontsize=7, loc="best")
    ax.set_title("accuracy against privacy" + (f" (mean over {seeds} seeds, band: ± 1 sd)" if seeds > 1 else ""))
    return by_round, fig


# --------------------------------------------------------------------------------------------
# command line


def add_parser(sub: Any) -> None:
    """Register ``fedsim sweep`` on an argparse subparsers object."""
    p = sub.add_parser(
        "sweep",
        help="run a grid of scenario variants over seeds (privacy-utility studies)",
        description="Run every combination of --grid values, once per seed, each as a normal run "
        "directory under --out; complete runs are skipped (resumable); writes results.csv, results.md, "
        "runs.csv and plots.",
    )
    p.add_argument("scenario", help="path to the base scenario TOML file")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a scenario key and its values, e.g. --grid strategy.target-rho=0.81,2.63 (repeatable)")
    p.add_argument("--config", action="append", default=[], metavar="'LABEL: KEY=V, KEY=V'",
                   help="a named method: overrides of the base scenario under a label shown in tables and plots, "
                        "e.g. --config 'FedAvg: strategy.name=fedavg' (repeatable; crossed with every --grid point)")
    p.add_argument("--last-evals", type=int, default=1, metavar="N",
                   help="a run's accuracy and loss: the mean of its last N evaluations (default 1: the final one)")
    p.add_argument("--seeds", type=int, default=1, help="runs per configuration, seeds scenario seed + 0..N-1 (default 1)")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: one per CPU)")
    p.add_argument("--backend", choices=("processes", "ray"), default="processes",
                   help="where runs execute: worker processes on this machine (default) or Ray tasks")
    p.add_argument("--ray-address", default="", help="--backend ray: a running cluster's address ('auto'); default a local Ray")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base scenario for every run, e.g. --set rounds=20")
    p.add_argument("--quiet", action="store_true", help="no progress bar (one line per finished run still)")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: Any) -> int:
    from fedsim.scenario import parse_override

    if args.workers is not None and args.workers < 1:
        raise SweepError(f"--workers must be >= 1, got {args.workers}")
    if args.ray_address and args.backend != "ray":
        raise SweepError("--ray-address needs --backend ray")
    if args.last_evals < 1:
        raise SweepError(f"--last-evals must be >= 1, got {args.last_evals}")
    grid = [parse_grid(g) for g in args.grid]
    methods = [parse_config(c) for c in args.config]
    if methods:
        configs = combine(methods, expand_grid(grid) if grid else [])
    else:
        configs = [Configuration(_label(c), c) for c in expand_grid(grid)] if grid else [Configuration("base", {})]
    overrides = [parse_override(t) for t in args.overrides]
    specs = plan_sweep(args.scenario, configs, seeds=args.seeds, out=args.out, overrides=overrides,
                       check_grid_keys=[k for k, _ in grid] + sorted({k for _, o in methods for k in o}))
    n_configs = len({s.config.name for s in specs})
    print(f"sweep: {n_configs} configuration(s) x {args.seeds} seed(s) = {len(specs)} runs -> {args.out}",
          file=sys.stderr)
    result = run_sweep(specs, args.out, workers=args.workers, backend=args.backend,
                       ray_address=args.ray_address, progress=not args.quiet, last_evals=args.last_evals,
                       echo=None if not args.quiet else lambda s: print(s, file=sys.stderr))
    print(results_markdown(result), end="")
    print(f"results: {Path(args.out) / 'results.md'} ({result.wall_time_s:.1f} s, {result.skipped} skipped)",
          file=sys.stderr)
    return 1 if result.failed else 0
