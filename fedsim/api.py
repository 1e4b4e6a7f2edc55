"""fedsim from Python: :func:`run` a scenario and :func:`plan` a privacy budget.

The stable entry points for scripts and notebooks (``fedsim.run``, ``fedsim.plan``, imported on
first use: ``import fedsim`` stays light)::

    import fedsim

    result = fedsim.run("scenarios/quickstart.toml", overrides={"rounds": 5, "client.lr": 0.05},
                        out="runs/notebook", overwrite=True)
    result.summary["accuracy"]        # summary.json
    result.metrics[-1]                # metrics.jsonl, one dict per round
    result.to_pandas()                # the same rows as a DataFrame (needs pandas)
    result.run_dir                    # the run directory

    fedsim.plan("dp-ftrl", target_rho=0.81, rounds=2000, max_participations=6,
                min_separation=313, delta=1e-10)["noise_multiplier"]

:func:`run` does what ``fedsim run`` does (the same validation, run directory, files and
summary); :func:`plan` gives what ``fedsim privacy ... --json`` prints, computed by the same
code. Bad input raises :class:`fedsim.errors.FedsimError` (a :class:`ScenarioError` for the
scenario, also a ``ValueError``) with the one-line message the command line prints.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.errors import FedsimError

if TYPE_CHECKING:
    import pandas

    from fedsim.scenario import Scenario

__all__ = ["RunOutput", "plan", "run"]


@dataclasses.dataclass(frozen=True)
class RunOutput:
    """What :func:`run` returns: the run's summary, its metrics and where its files are.

    Attributes
    ----------
    summary:
        ``summary.json``: final ``accuracy``, ``loss``, ``rho``, ``epsilon``, ``noise_multiplier``,
        ``rounds``, ``stopped_reason``, ``wall_time_s``, ... (README, "The run directory").
    metrics:
        ``metrics.jsonl``: one dict per completed round (``round``, ``accuracy``, ``loss``,
        ``rho``, ``epsilon``, ...); a DP run's withheld values are ``None`` here too.
    run_dir:
        The run directory (``config.toml``, ``model.pt``, ``metrics.png``, ...).
    scenario:
        The validated scenario that ran (overrides applied).
    """

    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    run_dir: Path
    scenario: Scenario

    def to_pandas(self) -> pandas.DataFrame:
        """The metrics as a :class:`pandas.DataFrame`, one row per round, indexed by ``round``.

        Raises
        ------
        ImportError
            pandas is not installed (``pip install pandas``; ``make install`` installs it).
        """
        try:
            import pandas
        except ImportError:
            raise ImportError("RunOutput.to_pandas() needs pandas: pip install pandas (rows: RunOutput.metrics)") from None
        return pandas.DataFrame.from_records(self.metrics, index="round") if self.metrics else pandas.DataFrame()


def run(
    scenario: str | os.PathLike[str] | Mapping[str, Any] | Scenario,
    *,
    overrides: Mapping[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> RunOutput:
    """Run a scenario end to end, as ``fedsim run`` does, and return its results.

    Parameters
    ----------
    scenario:
        A scenario file (TOML), a scenario as a dict of its TOML keys (kebab-case, nested tables
        as dicts; relative plug-in paths resolve against the working directory), or a
        :class:`~fedsim.scenario.Scenario`.
    overrides:
        Dotted keys and values, as ``--set KEY=VALUE`` takes them: ``{"rounds": 2,
        "client.lr": 0.05, "strategy.name": "fedavg"}``. Values are Python values (a string
        stays a string). Replacing ``strategy.name`` drops the replaced strategy's parameters
        with a :class:`~fedsim.errors.ScenarioNote` warning, as ``--set`` does.
    out:
        The run directory (default: the scenario's ``output-dir``, ``runs/<name>``).
    overwrite:
        Replace an earlier run in the run directory; without it a directory that holds a run is
        refused (:class:`~fedsim.engine.rundir.RunDirExists`), as on the command line.
    progress:
        Show the progress bar (tqdm; in a notebook its widget when ipywidgets is installed).

    Returns
    -------
    RunOutput
        The summary, the per-round metrics and the run directory.

    Raises
    ------
    fedsim.errors.ScenarioError
        The scenario or an override is invalid (nothing ran).
    fedsim.errors.FedsimError
        Any other input problem: the run directory holds a run, a tracker's package is missing.
    """
    from fedsim.scenario import Scenario, load_scenario, scenario_from_dict
    from fedsim.tracking import check_available

    pairs: list[Any] = [(str(key).split("."), value) for key, value in (overrides or {}).items()]
    for key, _ in pairs:
        if not all(key):
            raise FedsimError(f"overrides: expects dotted keys like 'client.lr', got {'.'.join(key)!r}")
    if out is not None:
        if not str(out).strip():
            raise FedsimError("out: must be a directory path, got ''")
        pairs.append((["output-dir"], str(out)))
    if isinstance(scenario, Scenario):
        loaded = scenario_from_dict(scenario.to_dict(), source=scenario.source, overrides=pairs) if pairs else scenario
    elif isinstance(scenario, Mapping):
        loaded = scenario_from_dict(dict(scenario), overrides=pairs)
    elif isinstance(scenario, str | os.PathLike):
        loaded = load_scenario(scenario, pairs)
    else:
        raise FedsimError(f"scenario: expects a path, a dict or a Scenario, got {type(scenario).__name__}")
    check_available(loaded.log)

    from fedsim.backends import open_run
    from fedsim.engine.rundir import claim_run_dir

    claim_run_dir(loaded.output_dir, overwrite=overwrite)
    result = open_run(loaded, run_dir=loaded.output_dir, progress=progress).run()
    assert result.run_dir is not None
    return RunOutput(dict(result.summary), [dict(row) for row in result.metrics], Path(result.run_dir), loaded)


def plan(
    mechanism: str,
    *,
    rounds: int,
    delta: float,
    noise_multiplier: float | None = None,
    target_rho: float | None = None,
    max_participations: int | None = None,
    min_separation: int | None = None,
    restart_every: int | None = None,
    sampling_rate: float | None = None,
    noise_mechanism: str | None = None,
    estimator: str | None = None,
    buffers: int | None = None,
    blt_params: str | os.PathLike[str] | None = None,
    bands: int | None = None,
    error: str | None = None,
    max_iterations: int | None = None,
    target_quantile: float | None = None,
    count_noise_multiplier: float | None = None,
    count_rho_fraction: float | None = None,
    coefficients: bool = False,
    equivalent_cohort: int | None = None,
    clients_per_round: int | None = None,
    equivalent_population: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Plan a run's privacy budget: what ``fedsim privacy MECHANISM ... --json`` prints.

    The arguments are the command's flags (``target_rho`` is ``--target-rho``; ``noise_mechanism``
    is dp-ftrl's ``--mechanism``, ``error`` its ``--error``); ``None`` leaves a flag out, so its
    default is the command's. The answer is computed by the same code as the command
    (:func:`fedsim.privacy_cli.plan`), so the two always agree.

    Parameters
    ----------
    mechanism:
        ``"dp-ftrl"`` or ``"dp-fedavg"``.
    rounds, delta:
        The run's rounds and the target delta.
    noise_multiplier, target_rho:
        Exactly one: the noise multiplier, or the zCDP ``rho`` to solve the smallest one for.
    max_participations, min_separation:
        Contributions per device and rounds strictly between two of them (required for
        dp-ftrl; dp-fedavg: defaults as the command's).
    restart_every:
        dp-ftrl, tree: start a new tree every so many rounds.
    sampling_rate:
        dp-fedavg: Poisson sampling rate of devices (amplifies epsilon, not rho).
    noise_mechanism:
        The command's ``--mechanism``: dp-ftrl ``"tree"`` (default), ``"blt"``, ``"banded"``, or
        any registered mechanism that fits the strategy.
    estimator, buffers, blt_params, bands, error, max_iterations:
        dp-ftrl's ``--estimator``, ``--buffers``, ``--blt-params``, ``--bands``, ``--error``,
        ``--max-iterations``.
    target_quantile, count_noise_multiplier, count_rho_fraction:
        Adaptive clipping (``--target-quantile``, ...): the clipped-count queries are planned and
        accounted with the updates (``count_noise_multiplier``, ``count_rho``, ``update_rho``).
    coefficients:
        Banded: include all of the factorization's ``coefs`` (``--coefficients``).
    equivalent_cohort, clients_per_round, equivalent_population:
        ``--equivalent-cohort N --clients-per-round n [--equivalent-population P]``: a simulation of
        ``n`` clients per round with the noise per client of a deployment of ``N``
        (``[privacy] equivalent-cohort``); ``rho`` / ``epsilon`` / ``noise_multiplier`` are then the
        simulation's, ``equivalent_rho`` / ``equivalent_epsilon`` / ``equivalent`` the deployment's.
    **options:
        The option flags of any other registered mechanism (``scale=3`` is ``--scale 3``).

    Returns
    -------
    dict
        ``rho``, ``epsilon``, ``epsilon_rdp``, ``delta``, ``noise_multiplier`` and the rest of the
        command's JSON object (``prefix_rmse`` and ``noise_mechanism`` for dp-ftrl).

    Raises
    ------
    ValueError
        Bad input, with the message the command prints after ``error:``. Notes the command
        prints as ``warning:`` (an infeasible ``max_participations``) are ``UserWarning``\\ s.
    """
    from fedsim.privacy_cli import plan as cli_plan

    flags: dict[str, Any] = {
        "--rounds": rounds,
        "--delta": delta,
        "--noise-multiplier": noise_multiplier,
        "--target-rho": target_rho,
        "--max-participations": max_participations,
        "--min-separation": min_separation,
        "--restart-every": restart_every,
        "--sampling-rate": sampling_rate,
        "--mechanism": noise_mechanism,
        "--estimator": estimator,
        "--buffers": buffers,
        "--blt-params": os.fspath(blt_params) if blt_params is not None else None,
        "--bands": bands,
        "--error": error,
        "--max-iterations": max_iterations,
        "--target-quantile": target_quantile,
        "--count-noise-multiplier": count_noise_multiplier,
        "--count-rho-fraction": count_rho_fraction,
        "--equivalent-cohort": equivalent_cohort,
        "--clients-per-round": clients_per_round,
        "--equivalent-population": equivalent_population,
        **{"--" + key.replace("_", "-"): value for key, value in options.items()},
    }
    argv: list[str] = []
    for flag, value in flags.items():
        if value is not None:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    if coefficients:
        argv.append("--coefficients")
    return cli_plan(mechanism, argv)
