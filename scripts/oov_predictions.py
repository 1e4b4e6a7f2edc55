"""Next-word top-1 of finished runs, with and without the closed vocabulary's OOV token as a prediction.

fedsim's next-token accuracy (``fedsim/tasks.py``, TFF's ``accuracy_no_oov_or_eos``) leaves OOV, pad
and EOS *targets* out and counts a predicted OOV as wrong. A model fine-tuned on text with more
out-of-vocabulary words than its vocabulary's source learns that OOV is often the likeliest next
token: its loss falls while its top-1 can fall too, because argmax picks OOV. A keyboard never
suggests "OOV"; this script reports, for each run directory's final model (and the warm start it
began from, ``[model] init``), on the run's own test split:

* ``accuracy``: fedsim's metric;
* ``oov_predicted``: the share of counted targets where the model's top-1 is OOV;
* ``accuracy_no_oov_prediction``: top-1 over the real words only (OOV never predicted), the
  suggestion a keyboard would make.

Usage::

    python scripts/oov_predictions.py runs/gboard/*/seed-*        # one line per run, then per method
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from fedsim.builders import build_data, build_scenario_model
from fedsim.data.text import EOS, OOV, PAD
from fedsim.models import set_flat
from fedsim.scenario import load_scenario


def scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The three figures of the module docstring for ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    counted = (y != PAD) & (y != OOV) & (y != EOS)
    n = counted.sum().item()
    top1 = logits.argmax(-1)
    words = logits.clone()
    words[..., OOV] = -torch.inf
    return {
        "accuracy": ((top1 == y) & counted).sum().item() / n,
        "oov_predicted": ((top1 == OOV) & counted).sum().item() / n,
        "accuracy_no_oov_prediction": ((words.argmax(-1) == y) & counted).sum().item() / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (config.toml, model.pt)")
    args = parser.parse_args()
    per_method: dict[str, list[dict[str, float]]] = defaultdict(list)
    cache: dict[str, tuple] = {}
    for run in args.runs:
        scenario = load_scenario(run / "config.toml")
        key = json.dumps(scenario.data.params, sort_keys=True, default=str) + scenario.data.dataset
        if key not in cache:
            data = build_data(scenario)
            model = build_scenario_model(scenario, data, init=scenario.model.init is not None)
            cache[key] = (data, model, torch.as_tensor(data.test_x), torch.as_tensor(data.test_y))
            if scenario.model.init is not None:
                print(f"{'starting model':<60} " + json.dumps({k: round(v, 4) for k, v in scores(model, *cache[key][2:]).items()}))
        data, model, x, y = cache[key]
        set_flat(model, torch.load(run / "model.pt", weights_only=False)["flat"])
        s = scores(model, x, y)
        per_method[run.parent.name].append(s)
        print(f"{str(run):<60} " + json.dumps({k: round(v, 4) for k, v in s.items()}))
    print()
    for method, rows in per_method.items():
        mean = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in rows[0]}
        print(f"{method + f' (mean of {len(rows)})':<60} " + json.dumps(mean))


if __name__ == "__main__":
    main()
