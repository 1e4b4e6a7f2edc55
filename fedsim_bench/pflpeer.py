"""The pfl-research column of ``fedsim bench``: pfl 0.6.0 on the same cohort, in its own environment.

pfl pins its own dependencies, so it lives in a virtual environment of its own; the benchmark
finds that environment's interpreter through ``--pfl-python PATH``, else ``$FEDSIM_PFL_PYTHON``,
else ``.venv-pfl/bin/python`` in the repository (see :data:`PFL_INSTALL`). When none exists, each
row says so, with the install line, and the column is empty.

For a row, :func:`export` (in fedsim's interpreter) writes the cohort fedsim trains: the model as
initialised, the task's loss, every client's ``(x, y)`` and the recipe (epochs, batch size,
learning rate). :func:`run_pfl` then runs ``fedsim_bench/pfl_driver.py`` with pfl's interpreter,
in one process and in ``torch.distributed.run`` with ``processes`` processes, one torch thread
each, and returns pfl's round times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().with_name("pfl_driver.py")
#: How to make pfl's environment (docs/benchmarks.md, "The pfl-research column").
PFL_INSTALL = (
    "python3 -m venv ../pfl-venv && ../pfl-venv/bin/pip install torch==2.13.0 && "
    "echo torch==2.13.0 > ../pfl-constraints.txt && "
    "../pfl-venv/bin/pip install -c ../pfl-constraints.txt 'pfl[pytorch]==0.6.0', "
    "then --pfl-python ../pfl-venv/bin/python (or FEDSIM_PFL_PYTHON)"
)


def pfl_python(explicit: str | None = None) -> Path | None:
    """The pfl environment's interpreter (``explicit``, ``$FEDSIM_PFL_PYTHON``, ``.venv-pfl``), or ``None``."""
    given = explicit or os.environ.get("FEDSIM_PFL_PYTHON")
    candidate = Path(given) if given else ROOT / ".venv-pfl" / "bin" / "python"
    return candidate if candidate.is_file() else None


def missing_line() -> str:
    """The row's note when no pfl environment is found."""
    return f"skipped: no pfl-research environment (--pfl-python, $FEDSIM_PFL_PYTHON or .venv-pfl); install: {PFL_INSTALL}"


def export(sim: Any, clients: int, path: Path) -> Path:
    """Write the cohort of devices ``0 .. clients-1`` of ``sim`` (a fedsim ``Simulation``) for pfl.

    The model is a copy of ``sim``'s, with the run's initial parameters; the loss is the task's
    (``sim.trainer.objective``), so pfl minimises exactly what fedsim's clients minimise.
    """
    import copy

    from fedsim.models import set_flat

    model = copy.deepcopy(sim.trainer.model)
    set_flat(model, sim.params)
    objective = sim.trainer.objective
    if objective is None:
        from fedsim.tasks import Task

        objective = Task(sim.data.spec)
    cfg = sim.base_config
    data = [tuple(t.contiguous() for t in sim.data.client_data(dev)) for dev in range(clients)]
    torch.save(
        {"model": model, "objective": objective, "clients": data, "lr": cfg.lr, "batch": cfg.batch_size,
         "epochs": cfg.local_epochs},
        path,
    )
    return path


def run_pfl(python: Path, cohort: Path, rounds: int, processes: int, *, timeout: float = 1800.0) -> dict[str, Any]:
    """pfl's round times on an exported cohort, in ``processes`` processes (``{"error": ...}`` on failure)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if processes == 1:
        cmd = [str(python), str(DRIVER), str(cohort), str(rounds)]
    else:
        cmd = [str(python), "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={processes}", str(DRIVER), str(cohort), str(rounds)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"pfl ({processes} process(es)) timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"error": f"pfl ({processes} process(es)) failed (exit {proc.returncode}): {tail[0]}"}
    return json.loads(lines[-1])


def worker_export(spec: dict[str, Any]) -> dict[str, Any]:
    """``fedsim_bench.workers pfl-export``: build the row's simulation and export its cohort."""
    sim = simulation_for(spec)
    export(sim, spec["clients"], Path(spec["out"]))
    return {"exported": spec["clients"]}


def simulation_for(spec: dict[str, Any]) -> Any:
    """The fedsim ``Simulation`` of a benchmark row (``spec["name"]``: a dense model or a zoo row)."""
    from fedsim.engine import Simulation
    from fedsim.scenario import scenario_from_dict

    name = spec["name"]
    if name in ("logreg", "mlp"):
        from fedsim_bench import scenario_dict

        raw = scenario_dict(name, clients=spec["clients"], devices=spec["clients"], rounds=1, threads=1)
    else:
        from fedsim_bench.model_zoo import scenario_dict as zoo_dict

        raw = zoo_dict(name, clients=spec["clients"], rounds=1, threads=1, data_dir=Path(spec["data_dir"]))
    return Simulation(scenario_from_dict(raw), progress=False)


def measure_pfl(
    python: Path | None, spec: dict[str, Any], *, rounds: int, processes: tuple[int, ...], workdir: Path,
) -> dict[str, Any]:
    """The pfl figures of one row: updates/s per process count and the best of them.

    Returns ``{"pfl_updates_per_s": best or None, "pfl_updates_per_s_by_processes": {n: ...},
    "pfl_round_s": {n: [...]}, "error": line or None}``.
    """
    from fedsim_bench import best_of, measure

    out: dict[str, Any] = {"pfl_updates_per_s": None, "pfl_updates_per_s_by_processes": {}, "pfl_round_s": {},
                           "error": None}
    if python is None:
        out["error"] = missing_line()
        return out
    cohort = workdir / f"pfl-{spec['name']}.pt"
    made = measure("pfl-export", {**spec, "out": str(cohort), "threads": 1})
    if made.error:
        out["error"] = made.error
        return out
    errors = []
    for n in processes:
        res = run_pfl(python, cohort, rounds, n)
        if "error" in res:
            errors.append(res["error"])
            continue
        out["pfl_round_s"][str(n)] = res["round_s"]
        best = best_of(res["round_s"])
        if best:
            out["pfl_updates_per_s_by_processes"][str(n)] = spec["clients"] / best
    rates = out["pfl_updates_per_s_by_processes"].values()
    out["pfl_updates_per_s"] = max(rates) if rates else None
    out["error"] = "; ".join(errors) or None
    cohort.unlink(missing_ok=True)
    return out


if __name__ == "__main__":  # pragma: no cover - a manual check: python -m fedsim_bench.pflpeer ROW CLIENTS
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure_pfl(pfl_python(), {"name": sys.argv[1], "clients": int(sys.argv[2]), "data_dir": tmp},
                                     rounds=3, processes=(1, 2), workdir=Path(tmp))))
