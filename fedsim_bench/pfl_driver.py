"""pfl-research (Apple's ``pfl`` 0.6.0) on a benchmark row's cohort: run by pfl's own interpreter.

``fedsim bench`` exports a row's cohort (fedsim's initial model, its task's loss, every client's
``(x, y)`` and the local training recipe) to a file with :func:`fedsim_bench.pfl.export`, then
runs this script with the pfl environment's Python, once in one process and once under
``torch.distributed.run`` with one process per core (pfl shards each cohort across the processes
and all-reduces the sums, as its documentation prescribes). pfl trains the same clients with the
same model, loss, batch size, epochs and learning rate: ``FederatedAveraging`` on a
``SimulatedBackend``, the whole cohort every central iteration (its ``minimize_reuse`` sampler
over exactly the cohort's users), no evaluation. Each process runs one torch thread.

A round's seconds run from one ``after_central_iteration`` callback to the next (the first from
``on_train_begin``): user sampling, local training, the sum and the central update. Rank 0 prints
``{"round_s": [...], "processes": N, "pfl": version}`` as one JSON line.

    python fedsim_bench/pfl_driver.py COHORT.pt ROUNDS

The script imports only torch, pfl and (to unpickle the model and its loss) ``fedsim.models`` /
``fedsim.tasks``, which need nothing beyond torch; the caller puts the repository on
``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch


def build(cohort: dict[str, Any]) -> tuple[Any, Any, Any, Any, Any]:
    """pfl's model, federated dataset, backend and parameters for an exported cohort."""
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm.base import NNAlgorithmParams
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam.base import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Weighted
    from pfl.model.pytorch import PyTorchModel

    objective = cohort["objective"]

    class Wrapped(torch.nn.Module):
        """fedsim's model with the ``loss`` / ``metrics`` methods pfl calls."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

        def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
            self.eval() if eval else self.train()
            return objective.loss(self.inner(x), y)

        def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> dict[str, Any]:  # noqa: A002
            with torch.no_grad():
                value = float(self.loss(x, y, eval=True))
            return {"loss": Weighted(value * len(y), len(y))}

    module = Wrapped(cohort["model"])
    model = PyTorchModel(
        model=module, local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
    )
    users = [f"u{i}" for i in range(len(cohort["clients"]))]
    data = {u: Dataset(raw_data=[x, y]) for u, (x, y) in zip(users, cohort["clients"], strict=True)}
    dataset = FederatedDataset(data.__getitem__, get_user_sampler("minimize_reuse", users))
    backend = SimulatedBackend(training_data=dataset, val_data=dataset, postprocessors=[])
    train = NNTrainHyperParams(
        local_num_epochs=cohort["epochs"], local_learning_rate=cohort["lr"], local_batch_size=cohort["batch"],
    )
    algorithm_params = NNAlgorithmParams(
        central_num_iterations=cohort["rounds"], evaluation_frequency=10**9,
        train_cohort_size=len(users), val_cohort_size=None,
    )
    return model, backend, algorithm_params, train, NNEvalHyperParams(local_batch_size=cohort["batch"])


def main(argv: list[str] | None = None) -> int:
    """Run pfl on the exported cohort; rank 0 prints the round times as one JSON line."""
    import pfl
    from pfl.algorithm.federated_averaging import FederatedAveraging
    from pfl.callback.base import TrainingProcessCallback

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("error: usage: pfl_driver.py COHORT.pt ROUNDS", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    cohort = torch.load(args[0], weights_only=False)
    cohort["rounds"] = int(args[1])
    model, backend, algorithm_params, train, evaluate = build(cohort)
    marks: list[float] = []

    class Stopwatch(TrainingProcessCallback):
        def on_train_begin(self, *, model: Any) -> Any:
            from pfl.metrics import Metrics

            marks.append(time.perf_counter())
            return Metrics()

        def after_central_iteration(self, aggregate_metrics: Any, model: Any, *, central_iteration: int) -> Any:
            from pfl.metrics import Metrics

            marks.append(time.perf_counter())
            return False, Metrics()

    FederatedAveraging().run(
        algorithm_params=algorithm_params, backend=backend, model=model, model_train_params=train,
        model_eval_params=evaluate, callbacks=[Stopwatch()], send_metrics_to_platform=False,
    )
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) == 0:
        rounds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        print(json.dumps({"round_s": rounds, "processes": processes, "pfl": pfl.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
