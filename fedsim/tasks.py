"""Tasks: the training loss and the test metrics of a dataset's task (:class:`~fedsim.data.DataSpec`).

* **classification**: logits ``[b, C]``, labels ``[b]``; loss = mean cross-entropy; metrics
  ``accuracy`` (top-1) and ``loss``.
* **next-token**: logits ``[b, L, V]``, targets ``[b, L]``; loss = cross-entropy summed over the
  target tokens that are not padding, divided by their number (a minibatch of padding only has
  loss 0); metrics ``accuracy`` (top-1 over the target tokens that are not padding, out of
  vocabulary or end of sequence, as the Gboard papers report next-word accuracy: Hard et al.
  2018, "Federated Learning for Mobile Keyboard Prediction"), ``loss`` (the per-token
  cross-entropy over non-padding targets) and ``perplexity`` (``exp(loss)``).

The same :meth:`Task.loss` is what every trainer path minimises (the per-client loop, the
``torch.func`` path and the checks when the run starts), so they agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.data.spec import DataSpec

#: Test examples evaluated per forward pass (bounds the logits' memory for language models).
EVAL_BATCH = 512


@dataclass(frozen=True)
class Task:
    """Loss and metrics for one :class:`DataSpec`."""

    spec: DataSpec

    @property
    def kind(self) -> str:
        return self.spec.task

    # -------------------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The minibatch training loss (a scalar)."""
        if self.spec.task == "classification":
            return F.cross_entropy(logits, y)
        total, count = self.loss_sum(logits, y)
        return total / count.clamp(min=1)

    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum of per-target losses, number of targets counted)``; padding targets count 0."""
        if self.spec.task == "classification":
            return F.cross_entropy(logits, y, reduction="sum"), torch.tensor(y.shape[0], dtype=logits.dtype)
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_y = y.reshape(-1)
        per = F.cross_entropy(flat_logits, flat_y, reduction="none")
        if self.spec.pad_id is None:
            return per.sum(), torch.tensor(flat_y.numel(), dtype=logits.dtype)
        keep = (flat_y != self.spec.pad_id).to(logits.dtype)
        return (per * keep).sum(), keep.sum()

    def per_example_loss(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss summed over each example's targets [b], targets counted per example [b])``."""
        if self.spec.task == "classification":
            per = F.cross_entropy(logits, y, reduction="none")
            return per, torch.ones_like(per)
        b, length = y.shape
        per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(b, length)
        if self.spec.pad_id is None:
            return per.sum(dim=1), torch.full((b,), float(length), dtype=per.dtype)
        keep = (y != self.spec.pad_id).to(per.dtype)
        return (per * keep).sum(dim=1), keep.sum(dim=1)

    def metric_keys(self) -> tuple[str, ...]:
        """The test metrics :meth:`evaluate` reports, in ``metrics.jsonl`` order."""
        if self.spec.task == "classification":
            return ("accuracy", "loss")
        return ("accuracy", "loss", "perplexity")

    # -------------------------------------------------------------------------------------------
    def output_shape(self, batch: int) -> tuple[int, ...]:
        """The logits shape the model must produce for ``batch`` inputs."""
        if self.spec.task == "classification":
            return (batch, self.spec.num_classes)
        return (batch, *self.spec.input_shape, self.spec.num_classes)

    def accuracy_mask(self, y: torch.Tensor) -> torch.Tensor:
        """Targets counted in accuracy (next-token: not pad, OOV or EOS)."""
        excluded = self.spec.excluded_ids() if self.spec.task == "next-token" else ()
        if not excluded:
            return torch.ones_like(y, dtype=torch.bool)
        return ~torch.isin(y, torch.tensor(excluded, dtype=y.dtype))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Test metrics of ``model`` on ``(x, y)`` (in eval mode; the mode is restored).

        Classification: ``accuracy``, ``loss``. Next-token: ``accuracy`` (pad, OOV and EOS
        targets excluded), ``loss`` (per non-padding token), ``perplexity``.
        """
        was_training = model.training
        model.eval()
        if self.spec.task == "classification":  # one pass, the formula fedsim has always reported
            try:
                logits = model(x)
            finally:
                model.train(was_training)
            return {
                "accuracy": float((logits.argmax(dim=1) == y).float().mean()),
                "loss": float(F.cross_entropy(logits, y)),
            }
        try:
            loss_total = 0.0
            loss_count = 0.0
            correct = 0
            counted = 0
            for start in range(0, int(y.shape[0]), EVAL_BATCH):
                xb, yb = x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
                logits = model(xb)
                total, count = self.loss_sum(logits, yb)
                loss_total += float(total)
                loss_count += float(count)
                mask = self.accuracy_mask(yb)
                correct += int(((logits.argmax(dim=-1) == yb) & mask).sum())
                counted += int(mask.sum())
        finally:
            model.train(was_training)
        loss = loss_total / loss_count if loss_count else float("nan")
        accuracy = correct / counted if counted else float("nan")
        perplexity = math.exp(loss) if loss < 700 else float("inf")
        return {"accuracy": accuracy, "loss": loss, "perplexity": perplexity}


#: The classification task on flat features, for trainers built without a dataset spec.
def classification_task(num_features: int, num_classes: int) -> Task:
    """A classification :class:`Task` for ``num_features`` inputs and ``num_classes`` classes."""
    return Task(DataSpec("classification", (num_features,), num_classes))
