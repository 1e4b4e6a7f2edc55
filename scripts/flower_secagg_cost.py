"""Seconds per round and bytes per device of a Flower deployment, with and without SecAgg+.

Starts one local deployment (a SuperLink and one SuperNode per device on 127.0.0.1, with the test
suite's harness: ``tests/flower/harness.py``, warm executors) and runs the same DP-FTRL scenario
on it in the clear and under ``secure-aggregation=true``, alternating, ``--repeats`` times each.
Prints one line per run and the medians (docs/flower.md, "Secure aggregation", "Cost").

    python scripts/flower_secagg_cost.py --devices 3 --rounds 4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.flower.harness import check_ran, running_cluster, write_scenario  # noqa: E402


def scenario(path: Path, devices: int, rounds: int, model: str) -> Path:
    """DP-FTRL with the whole population in every round (digits; ``model``: logreg or mlp)."""
    return write_scenario(
        path,
        {
            "name": "secagg-cost",
            "seed": 1,
            "rounds": rounds,
            "clients-per-round": devices,
            "data": {"dataset": "digits", "num-devices": devices, "partitioner": "iid"},
            "model": {"name": model},
            "client": {"local-epochs": 1, "batch-size": 32, "lr": 0.1},
            "strategy": {
                "name": "dp-ftrl", "noise-multiplier": 1.0, "clip-norm": 1.0, "max-participations": rounds,
                "min-separation": 0,
            },
            "privacy": {"delta": 1e-5},
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="logreg")
    args = parser.parse_args()
    rows: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp, running_cluster(Path(tmp) / "cluster") as cluster:
        for device in range(args.devices):
            cluster.start_supernode(device)
        file = scenario(Path(tmp) / "cost.toml", args.devices, args.rounds, args.model)
        n = 0
        for _ in range(args.repeats):
            for secure in (False, True):
                n += 1
                out = Path(tmp) / f"run-{n}"
                proc = cluster.flwr_run(
                    {"scenario": str(file), "out-dir": str(out), "min-nodes": args.devices, "round-timeout": 120.0,
                     "secure-aggregation": secure},
                    timeout=600,
                )
                check_ran(proc, cluster)
                summary = json.loads((out / "summary.json").read_text())
                exact = json.loads((out / "private" / "summary.json").read_text())["flower"]
                traffic = exact["traffic"]
                row = {
                    "s_per_round": summary["wall_time_s"] / summary["rounds"],
                    "bytes_per_device_round": traffic["bytes_per_device_round"],
                    "sent": traffic["bytes_sent"] / traffic["device_rounds"],
                    "received": traffic["bytes_received"] / traffic["device_rounds"],
                }
                rows[secure].append(row)
                print(("secagg " if secure else "clear  ") + json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
    for secure in (False, True):
        med = {k: statistics.median(r[k] for r in rows[secure]) for k in rows[secure][0]}
        print(("median secagg " if secure else "median clear  ") + json.dumps({k: round(v, 2) for k, v in med.items()}))


if __name__ == "__main__":
    main()
