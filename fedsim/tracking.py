"""Experiment tracking: TensorBoard and MLflow as a callback on the run's rounds (``[log]``).

A :class:`Tracker` is called where the round owner commits a round's public row (the line it
appends to ``metrics.jsonl``) and once when the run finishes (with ``summary.json``'s content and
the run directory). It logs exactly what those public files hold:

* ``[log] tensorboard = true``: TensorBoard event files in the run directory, one scalar per
  metric and round (``accuracy``, ``loss``, ``rho``, ``epsilon``, ...) and, at the end, the
  summary and the resolved scenario as text (``tensorboard --logdir runs`` shows every run);
* ``[log] mlflow = true``: one MLflow run in the experiment ``[log] mlflow-experiment`` (default:
  the scenario's name) with the resolved scenario as parameters (dotted keys, ``client.lr``),
  every round's metrics (step = round), the summary's numbers as ``summary.*`` metrics, and
  ``summary.json``, ``config.toml``, ``metrics.jsonl``, ``ledger.json`` and the plots as
  artifacts. The store is ``mlruns/`` in the run directory (an MLflow file store) unless
  ``[log] mlflow-uri`` names another tracking URI.

Under DP the rows and the summary a tracker receives are the published ones, where the exact,
unnoised values (``train_loss``, client counts, rejections) are ``null``: nulls are not logged, so
nothing of ``private/`` reaches TensorBoard or MLflow; nor does any file of ``private/``,
``secret/`` or ``checkpoints/`` become an artifact.

TensorBoard and MLflow are optional (the ``tracking`` extra: ``pip install -e '.[tracking]'``;
``make install`` installs them); :func:`check_available` says, before a run starts, which one a
scenario asks for that is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedsim.errors import FedsimError

__all__ = ["MLFLOW_STORE", "RUN_ARTIFACTS", "Tracker", "TrackingError", "check_available", "flatten", "open_tracker"]

#: The MLflow file store in the run directory (when ``[log] mlflow-uri`` is empty).
MLFLOW_STORE = "mlruns"
#: Public files of a finished run that become MLflow artifacts (those that exist).
RUN_ARTIFACTS = ("summary.json", "config.toml", "metrics.jsonl", "ledger.json", "metrics.png")

_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


class TrackingError(FedsimError):
    """``[log]`` asks for a tracker whose package is not installed (one line, exit 2)."""


def check_available(log: Any) -> None:
    """Raise :class:`TrackingError` when ``log`` (a ``[log]`` section) enables a tracker whose
    package is missing. Cheap: looks the packages up without importing them."""
    for key, package in _PACKAGES.items():
        if getattr(log, key, False) and importlib.util.find_spec(package) is None:
            raise TrackingError(
                f"[log] {key} = true needs the {package} package: pip install -e '.[tracking]' "
                f"(make install installs it), or set log.{key} = false"
            )


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested scenario dict as dotted keys (``{"client": {"lr": 0.1}}`` -> ``{"client.lr": 0.1}``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a row (booleans, nulls, text and the round number left out)."""
    return {
        key: float(value)
        for key, value in row.items()
        if key != "round" and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


class Tracker:
    """The run's trackers; :meth:`on_round` per committed round, :meth:`on_finish` at the end.

    Parameters
    ----------
    run_dir:
        The run directory (TensorBoard's event files; MLflow's default store).
    config:
        The resolved scenario (``config.toml``'s content): MLflow's parameters.
    tensorboard, mlflow:
        Which trackers to open.
    mlflow_uri:
        MLflow tracking URI (``""``: ``mlruns/`` in the run directory).
    experiment:
        MLflow experiment name.
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: Mapping[str, Any],
        *,
        tensorboard: bool = False,
        mlflow: bool = False,
        mlflow_uri: str = "",
        experiment: str = "fedsim",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.config = dict(config)
        self.tensorboard = tensorboard
        self.mlflow = mlflow
        self.mlflow_uri = mlflow_uri or (self.run_dir.resolve() / MLFLOW_STORE).as_uri()
        self.experiment = experiment
        self._writer: Any = None
        self._client: Any = None
        self._run_id: str | None = None

    # -- opening ----------------------------------------------------------------------------
    def _tb(self, step: int = 1) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run (first round logged here > 1) hides what the stopped process logged
            # from that round on: the rounds after its last checkpoint are replayed
            self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=step if step > 1 else None)
        return self._writer

    def _ml(self, step: int = 1) -> tuple[Any, str]:
        if self._client is None:
            with _file_store_allowed(self.mlflow_uri):
                from mlflow.entities import Param
                from mlflow.tracking import MlflowClient

                client = MlflowClient(tracking_uri=self.mlflow_uri)
                found = client.get_experiment_by_name(self.experiment)
                experiment_id = found.experiment_id if found is not None else client.create_experiment(self.experiment)
                where = str(self.run_dir.resolve())
                run_id = self._unfinished_run(client, experiment_id, where) if step > 1 else None
                if run_id is None:  # a new run (a resumed one whose MLflow run is not found: a new one too)
                    run = client.create_run(
                        experiment_id, run_name=self.run_dir.name or self.config.get("name"), tags={"fedsim.run_dir": where}
                    )
                    run_id = run.info.run_id
                    items = [(k, _param(v)) for k, v in flatten(self.config).items()]
                    for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
                        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
            self._client, self._run_id = client, run_id
        assert self._run_id is not None
        return self._client, self._run_id

    @staticmethod
    def _unfinished_run(client: Any, experiment_id: str, where: str) -> str | None:
        """The MLflow run a stopped process left open for this run directory (a resume continues it)."""
        if "'" in where:
            return None
        runs = client.search_runs(
            [experiment_id], filter_string=f"tags.`fedsim.run_dir` = '{where}' and attributes.status = 'RUNNING'"
        )
        return runs[0].info.run_id if runs else None

    # -- the callback -------------------------------------------------------------------------
    def on_round(self, row: Mapping[str, Any]) -> None:
        """Log one committed round's public metrics (``metrics.jsonl``'s line; nulls skipped)."""
        step = int(row["round"])
        values = _scalars(row)
        if self.tensorboard:
            writer = self._tb(step)
            for key, value in values.items():
                writer.add_scalar(key, value, global_step=step)
            writer.flush()
        if self.mlflow and values:
            from mlflow.entities import Metric

            client, run_id = self._ml(step)
            now = _now_ms()
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def on_finish(self, summary: Mapping[str, Any]) -> None:
        """Log the summary (``summary.json``'s content) and the run's public files; close."""
        numbers = _scalars({k: v for k, v in summary.items() if k not in ("seed", "num_devices")})
        text = json.dumps(dict(summary), indent=2, default=str)
        if self.tensorboard:
            writer = self._tb()
            writer.add_text("summary", _markdown_code(text))
            writer.add_text("config", _markdown_code(json.dumps(self.config, indent=2, default=str)))
            writer.close()
            self._writer = None
        if self.mlflow:
            from mlflow.entities import Metric

            client, run_id = self._ml()
            now = _now_ms()
            if numbers:
                client.log_batch(run_id, metrics=[Metric(f"summary.{k}", v, now, 0) for k, v in numbers.items()])
            for name in RUN_ARTIFACTS:
                path = self.run_dir / name
                if path.is_file():
                    client.log_artifact(run_id, str(path))
            client.set_tag(run_id, "fedsim.stopped_reason", str(summary.get("stopped_reason")))
            client.set_terminated(run_id, status="FINISHED")

    def close(self) -> None:
        """Close what is open (a run that stopped by an error): event files flushed."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def open_tracker(scenario: Any, run_dir: Any) -> Tracker | None:
    """The tracker a scenario's ``[log]`` section asks for, or ``None`` (nothing asked, or no run
    directory to log beside)."""
    log = getattr(scenario, "log", None)
    if log is None or run_dir is None or not (log.tensorboard or log.mlflow):
        return None
    check_available(log)
    path = getattr(run_dir, "path", run_dir)
    return Tracker(
        path,
        scenario.to_dict(),
        tensorboard=log.tensorboard,
        mlflow=log.mlflow,
        mlflow_uri=log.mlflow_uri,
        experiment=log.mlflow_experiment or scenario.name,
    )


def _param(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict | bool) or value is None else str(value)
    return text[:6000]  # MLflow's limit on a parameter's value


def _markdown_code(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set: allow it while
    the client opens a ``file:`` store (the store is built then and cached by MLflow)."""
    if not uri.startswith("file:") or os.environ.get("MLFLOW_ALLOW_FILE_STORE"):
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
