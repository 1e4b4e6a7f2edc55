"""Local-training cost of the next-word models for the Gboard-like scenario (LSTM vs transformer).

Times one client's local SGD (the reference per-client loop of ``clients/sgd.py``: forward,
masked next-token loss, backward, update) on token sequences shaped like
``scenarios/shakespeare_dp_ftrl.toml`` (vocabulary 5,004, length 12, batch 8), single-threaded,
for ``lstm-lm`` and ``transformer-lm`` at comparable sizes, and prints CPU milliseconds per
training sequence (process time, so other processes on a shared machine do not inflate it).

Usage::

    python scripts/bench_lm.py            # about 30 s
    python scripts/bench_lm.py --vocab 10004 --length 20 --batch 16
"""

from __future__ import annotations

import argparse
import time

import torch

from fedsim.data.spec import DataSpec
from fedsim.models import build_model
from fedsim.tasks import Task

CANDIDATES = (
    ("lstm-lm", {"embedding": 32, "hidden": 64, "layers": 1}),
    ("lstm-lm", {"embedding": 32, "hidden": 32, "layers": 1}),
    ("lstm-lm", {"embedding": 64, "hidden": 128, "layers": 1}),
    ("transformer-lm", {"dim": 32, "layers": 1, "heads": 2}),
    ("transformer-lm", {"dim": 64, "layers": 2, "heads": 4}),
)


def time_model(name: str, params: dict, spec: DataSpec, batch: int, steps: int) -> tuple[int, float]:
    """``(parameters, CPU ms per sequence)`` of ``steps`` SGD steps on random token batches."""
    model = build_model(name, spec=spec, params=dict(params), seed=0)
    task = Task(spec)
    gen = torch.Generator().manual_seed(0)
    length = spec.input_shape[0]
    x = torch.randint(4, spec.vocab_size, (batch, length), generator=gen)
    y = torch.randint(4, spec.vocab_size, (batch, length), generator=gen)
    weights = list(model.parameters())

    def step() -> None:
        loss = task.loss(model(x), y)
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            for w, g in zip(weights, grads, strict=True):
                w.sub_(0.1 * g)

    for _ in range(3):
        step()
    start = time.process_time()
    for _ in range(steps):
        step()
    per_seq = (time.process_time() - start) / (steps * batch) * 1e3
    return sum(p.numel() for p in weights), per_seq


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=5004, help="vocabulary size incl. special ids (default 5004)")
    parser.add_argument("--length", type=int, default=12, help="sequence length (default 12)")
    parser.add_argument("--batch", type=int, default=8, help="local batch size (default 8)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model (default 30)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spec = DataSpec("next-token", (args.length,), args.vocab, pad_id=0, oov_ids=(1,), eos_id=3)
    print(f"vocabulary {args.vocab}, length {args.length}, batch {args.batch}, 1 thread")
    print("| model | parameters | CPU ms per training sequence |")
    print("|---|---|---|")
    for name, params in CANDIDATES:
        n, ms = time_model(name, params, spec, args.batch, args.steps)
        desc = ", ".join(f"{k} {v}" for k, v in params.items())
        print(f"| {name} ({desc}) | {n / 1e3:.0f}k | {ms:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
