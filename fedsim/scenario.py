"""Scenarios: TOML files mapped onto frozen, validated dataclasses.

A scenario file uses kebab-case keys; every section maps onto one dataclass below and every value
is type-checked and range-checked before anything runs. Errors are :class:`ScenarioError` naming
the file, the dotted key and what is allowed. Example (``scenarios/quickstart.toml``)::

    name = "quickstart"
    seed = 0
    rounds = 30
    clients-per-round = 20

    [data]
    dataset = "digits"
    partitioner = "dirichlet"
    alpha = 1.0
    num-devices = 100

    [model]
    name = "mlp"
    hidden = 64

    [client]
    local-epochs = 2
    batch-size = 8
    lr = 0.1

    [strategy]
    name = "fedavg"          # or "dp-fedavg", "dp-ftrl", "package.module:Class", "file.py:Class"
    # any other key here is a parameter of the strategy (a field of its Params, kebab-case)

The strategy's (and trainer's) own parameters are mapped onto its ``Params`` dataclass (names,
annotated types, the dataclass's value checks; see :mod:`fedsim.registry`), or for a plug-in
without one checked against its constructor's signature, when the scenario is loaded, so a typo
fails before the run starts.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import inspect
import math
import tomllib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedsim.dataset_traits import DEFAULT_NUM_DEVICES, dataset_traits
from fedsim.errors import ScenarioError, ScenarioNote, unknown_key_message
from fedsim.validation import MAX_ROUNDS, boolean, is_int, is_number, number_in, positive_number
from fedsim.validation import run_id as check_run_id

# --------------------------------------------------------------------------------------------
# validation helpers: each names the field it checks (fedsim.validation's checks, whose
# ValueError becomes a ScenarioError on the key; values are already of their annotated types)


def _checked(check: Any, name: str, *args: Any, **kwargs: Any) -> None:
    try:
        check(name, *args, **kwargs)
    except ValueError as exc:
        raise ScenarioError(str(exc).removeprefix(f"{name} "), key=name) from None


def _positive(name: str, value: float | int) -> None:
    _checked(positive_number, name, value)


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:  # an integer already: the message says only the bound
        raise ScenarioError(f"must be >= {low}, got {value!r}", key=name)


def _in_open_unit(name: str, value: float) -> None:
    _checked(number_in, name, value, 0.0, 1.0, low_open=True, high_open=True)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


# --------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: dataset, held-out split and partitioning across devices.

    ``dataset`` is a registered name (``digits``, ``synthetic``), a loader ``"pkg.mod:load"`` /
    ``"path/file.py:load"`` or a data file (``.npz``, ``.csv``, ``.jsonl``; see
    :mod:`fedsim.data.loaders`). Keys other than these are the loader's parameters.
    ``num-devices`` and ``partitioner`` default to 100 and ``iid`` for the datasets fedsim
    partitions itself (their registration says so: :mod:`fedsim.dataset_traits`; ``digits``,
    ``synthetic``); for other datasets unset means "the dataset's own" (one device per user id
    when the data has user ids).
    """

    dataset: str = "digits"
    num_devices: int | None = None
    partitioner: Literal["iid", "dirichlet", "natural"] | None = None
    alpha: float = 0.5
    test_fraction: float = 0.2
    # synthetic only
    examples_per_device: int = 64
    num_features: int = 784
    num_classes: int = 10
    #: reshape every example (e.g. [1, 8, 8]: the digits as images for the cnn)
    input_shape: tuple[int, ...] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ScenarioError("must name a dataset, a loader 'pkg.mod:load' or a data file", key="dataset")
        traits = dataset_traits(self.dataset)
        if traits.partitioned:  # its registration says fedsim partitions it itself
            if self.num_devices is None:
                object.__setattr__(self, "num_devices", DEFAULT_NUM_DEVICES)
            if self.partitioner is None:
                object.__setattr__(self, "partitioner", "iid")
            if self.partitioner == "natural":
                raise ScenarioError(f"dataset {self.dataset!r} has no user ids; use 'iid' or 'dirichlet'", key="partitioner")
        if self.num_devices is not None:
            _at_least("num-devices", self.num_devices, 1)
        _positive("alpha", self.alpha)
        _in_open_unit("test-fraction", self.test_fraction)
        _at_least("examples-per-device", self.examples_per_device, 1)
        _at_least("num-features", self.num_features, 1)
        _at_least("num-classes", self.num_classes, 2)
        if self.input_shape is not None and (not self.input_shape or any(d < 1 for d in self.input_shape)):
            raise ScenarioError(f"must be a non-empty list of integers >= 1, got {list(self.input_shape)!r}", key="input-shape")
        if traits.max_devices is not None and self.num_devices is not None and self.num_devices > traits.max_devices:
            raise ScenarioError(
                f"the {self.dataset} training split has {traits.max_devices} examples, cannot serve {self.num_devices} devices "
                "(use dataset = \"synthetic\" for large populations)",
                key="num-devices",
            )


@dataclass(frozen=True)
class PopulationConfig:
    """``[population]``: which devices check in each round."""

    availability: Literal["always", "bernoulli", "diurnal"] = "always"
    check_in_prob: float = 0.5
    period: int = 24
    amplitude: float = 0.8

    def __post_init__(self) -> None:
        _checked(number_in, "check-in-prob", self.check_in_prob, 0.0, 1.0, low_open=True)
        _at_least("period", self.period, 1)
        _checked(number_in, "amplitude", self.amplitude, 0.0, 1.0)


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the model every client trains.

    ``name`` is a built-in (``logreg``, ``mlp``, ``cnn``, ``lstm-lm``, ``transformer-lm``) or a
    builder ``"pkg.mod:build"`` / ``"path/file.py:build"`` called as ``build(spec, **params)``
    (see :mod:`fedsim.models`); other keys are the builder's parameters. ``hidden`` defaults to
    64 for ``logreg`` and ``mlp`` (logreg ignores it); other builders get it only when it is set.

    ``init`` starts the run from a saved model (a warm start): a fedsim run's ``model.pt`` or a
    plain ``state_dict`` file, relative to the scenario file first, then the working directory.
    The loaded scenario holds its absolute path and ``init-sha256``, the SHA-256 of its bytes
    (both written to ``config.toml``); given in a scenario, ``init-sha256`` must match the file.
    """

    name: str = "mlp"
    hidden: int | None = None
    init: str | None = None
    init_sha256: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ScenarioError("must name a model, a builder 'pkg.mod:build' or 'file.py:build'", key="name")
        if self.init is not None and not self.init.strip():
            raise ScenarioError("must be the path of a model file (a run's model.pt or a state_dict), got ''", key="init")
        if self.init_sha256 is not None:
            if self.init is None:
                raise ScenarioError("applies with init (the SHA-256 of the init file)", key="init-sha256")
            digits = self.init_sha256.lower()
            if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
                raise ScenarioError(f"must be 64 hex digits (a SHA-256), got {self.init_sha256!r}", key="init-sha256")
            object.__setattr__(self, "init_sha256", digits)
        if self.hidden is None and self.name in ("logreg", "mlp"):
            object.__setattr__(self, "hidden", 64)
        if self.hidden is not None:
            _at_least("hidden", self.hidden, 1)


@dataclass(frozen=True)
class ClientConfig:
    """``[client]``: local training. Keys other than these go to the trainer's constructor."""

    trainer: str = "sgd"
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.1
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _at_least("local-epochs", self.local_epochs, 1)
        _at_least("batch-size", self.batch_size, 1)
        _positive("lr", self.lr)


@dataclass(frozen=True)
class StrategyConfig:
    """``[strategy]``: ``name`` plus the strategy's own constructor parameters."""

    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: reporting delta and an optional budget that stops the run.

    ``noise-key-file`` names a fixed noise key (``fedsim privacy keygen FILE``) for reproducible
    research: the run's noise and secret sampling come from it instead of a fresh secret key,
    and ``summary.json`` says so. Empty (default): every DP run draws its own secret key.

    ``run-id`` is the run's public id (32 hex digits, 128 bits): it enters every noise and
    sampling word, so runs under one key (a fixed key file) draw independent noise. Empty
    (default): a DP or audited run draws a fresh one from :mod:`secrets`, recorded in its
    ``config.toml`` and ``summary.json``; set it (with the same key file) only to replay a run
    exactly.

    ``prior-runs`` lists run directories of earlier DP runs on the same people (one abandoned
    because its data changed, say): the rho of every round they released (their release records,
    ``private/releases.jsonl``) is added to this run's rho in ``metrics.jsonl``, ``summary.json``
    (``prior``) and the budget guard.

    ``equivalent-cohort`` (``N``; 0, the default: off) gives the run the noise per client of a
    deployment with ``N`` clients per round: the DP strategy's noise multiplier ``z`` (given, or
    solved from ``target-rho``) is the deployment's, and the run adds noise of std ``z C n / N``
    to the sum of its ``n`` clients (:mod:`fedsim.privacy.equivalent`). ``rho`` / ``epsilon``
    stay the guarantee of the run as it ran; the deployment's are reported beside them as
    ``equivalent_rho`` / ``equivalent_epsilon``. ``equivalent-population`` (``P``; 0: not stated)
    is the deployment's population: checked against what ``N`` and ``(k, b)`` need, and required
    for DP-FedAvg with Poisson sampling, whose amplification uses ``q = N / P``.
    """

    delta: float = 1e-6
    max_rho: float | None = None
    max_epsilon: float | None = None
    noise_key_file: str = ""
    run_id: str = ""
    prior_runs: tuple[str, ...] = ()
    equivalent_cohort: int = 0
    equivalent_population: int = 0

    def __post_init__(self) -> None:
        _in_open_unit("delta", self.delta)
        _at_least("equivalent-cohort", self.equivalent_cohort, 0)
        _at_least("equivalent-population", self.equivalent_population, 0)
        if self.equivalent_population and not self.equivalent_cohort:
            raise ScenarioError("is set without equivalent-cohort (the deployment's clients per round)",
                                key="equivalent-population")
        if any(not run.strip() for run in self.prior_runs):
            raise ScenarioError(f"must be run directory paths, got {list(self.prior_runs)!r}", key="prior-runs")
        if self.max_rho is not None:
            _positive("max-rho", self.max_rho)
        if self.max_epsilon is not None:
            _positive("max-epsilon", self.max_epsilon)
        if self.run_id:
            _checked(check_run_id, "run-id", self.run_id)
            object.__setattr__(self, "run_id", self.run_id.lower())


@dataclass(frozen=True)
class EngineConfig:
    """``[engine]``: how rounds are executed."""

    #: ``"inprocess"``: fedsim's engine; ``"flower"``: Flower's simulation engine (Ray), same strategy;
    #: ``"ray"``: fedsim's engine with cohort chunks trained on Ray workers (fedsim/engine/ray_backend.py)
    backend: Literal["inprocess", "flower", "ray"] = "inprocess"
    chunk_size: int = 256
    #: torch intra-op threads of the engine (and of each Ray worker); see docs/benchmarks.md
    threads: int = 1
    eval_every: int = 1
    #: Server-side bound on any client delta's L2 norm (all strategies, DP or not): a larger (or
    #: overflowing) update is rejected as ``norm_exceeds_max`` instead of being averaged in.
    max_update_norm: float = 1e4
    #: Largest example count a client may report (FedAvg's weight): larger counts are rejected as
    #: ``bad_example_count``, so one client cannot set the global step by claiming 2**53 examples.
    #: At most 2**24, where float32 weights stay exact.
    max_examples: int = 1_000_000
    #: Largest share of a round's total FedAvg weight (example counts) one update may take; the
    #: heaviest weights are lowered to a common cap when one exceeds it (fedsim.engine.aggregation).
    #: 0.5 (default): no client outweighs all the others together; 1: no cap.
    max_weight_share: float = 0.5
    #: backend = "ray": cluster address ("" = this process's Ray runtime or a new local one)
    ray_address: str = ""
    #: backend = "ray": number of workers (0 = one per CPU the Ray cluster reports)
    ray_workers: int = 0
    #: where client training and the server's streaming sum run: "auto" (CUDA when torch sees a
    #: CUDA device, else the CPU), "cpu" or "cuda" (see :meth:`torch_device`)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        _at_least("chunk-size", self.chunk_size, 1)
        _at_least("threads", self.threads, 1)
        _at_least("eval-every", self.eval_every, 1)
        _positive("max-update-norm", self.max_update_norm)
        _at_least("max-examples", self.max_examples, 1)
        if self.max_examples > 2**24:
            raise ScenarioError(
                f"must be <= 16777216 (2**24, where float32 weights are exact), got {self.max_examples!r}",
                key="max-examples",
            )
        _checked(number_in, "max-weight-share", self.max_weight_share, 0.0, 1.0, low_open=True)
        _at_least("ray-workers", self.ray_workers, 0)
        if self.device not in DEVICES:
            raise ScenarioError(f"must be one of {', '.join(map(repr, DEVICES))}, got {self.device!r}", key="device")
        if self.device == "cuda" and not cuda_available():
            raise ScenarioError(
                '"cuda" needs a CUDA device and torch sees none (torch.cuda.is_available() is false); '
                'use "auto" (CUDA when present, else the CPU) or "cpu"',
                key="device",
            )

    def torch_device(self) -> Any:
        """The ``torch.device`` that ``device`` names on this machine (``"auto"``: ``cuda`` when
        torch sees a CUDA device, else ``cpu``)."""
        import torch

        if self.device == "cuda" or (self.device == "auto" and cuda_available()):
            return torch.device("cuda")
        return torch.device("cpu")


#: ``[engine] device`` values.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (imports torch only when asked)."""
    import torch

    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class CheckpointConfig:
    """``[checkpoint]``: periodic, atomic checkpoints in the run directory (``fedsim run --resume``).

    ``every`` rounds (0 = no checkpoints) the engine writes ``checkpoints/ckpt-<round>.pt`` and
    keeps the newest ``keep`` of them (at least 2 lets a corrupted newest one fall back).
    """

    every: int = 0
    keep: int = 2

    def __post_init__(self) -> None:
        _at_least("every", self.every, 0)
        _at_least("keep", self.keep, 1)


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: canary clients for the one-shot empirical privacy estimate (docs/audit.md).

    ``canaries`` (0 = off) canary clients join the population as extra devices under the same
    participation limits and clipping; as many further canary directions are never inserted.
    ``threat-model`` is the estimate reported first (both are computed): ``"final-model"`` (the
    adversary sees the final model) or ``"all-iterates"`` (every round's model). ``canary-norm``
    is the L2 norm of a canary's update: the round's clip bound when omitted (1.0 for strategies
    that do not clip).
    """

    canaries: int = 0
    threat_model: Literal["final-model", "all-iterates"] = "final-model"
    canary_norm: float | None = None

    def __post_init__(self) -> None:
        _at_least("canaries", self.canaries, 0)
        if self.canaries == 1:
            raise ScenarioError("must be 0 (off) or >= 2 (a Gaussian is fitted to the canaries), got 1", key="canaries")
        if self.canary_norm is not None:
            _positive("canary-norm", self.canary_norm)


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: experiment tracking beside the run directory's own files (:mod:`fedsim.tracking`).

    ``tensorboard = true`` writes TensorBoard event files into the run directory; ``mlflow =
    true`` logs the resolved scenario as parameters, every round's metrics, the summary and the
    plots to MLflow: a file store ``mlruns/`` in the run directory unless ``mlflow-uri`` names
    another tracking URI, in the experiment ``mlflow-experiment`` (default: the scenario's
    name). Both log what ``metrics.jsonl`` and ``summary.json`` publish, nothing more: a DP
    run's withheld values (``private/``) are never logged. Needs the ``tracking`` extra
    (``pip install -e '.[tracking]'``; ``make install`` installs it).
    """

    tensorboard: bool = False
    mlflow: bool = False
    mlflow_uri: str = ""
    mlflow_experiment: str = ""


@dataclass(frozen=True)
class FlowerConfig:
    """``[flower]``: how a Flower deployment (or ``--backend flower``) runs the scenario.

    ``secure-aggregation = true`` runs every round under Flower's SecAgg+ (docs/flower.md,
    "Secure aggregation"): devices clip, quantise and mask their updates and the server learns
    only the cohort's sum. SecAgg+'s parameters:

    ``secagg-shares``
        shares each device's secrets are split into (its neighbours in the SecAgg+ graph, itself
        included); 0 (default): every member of the cohort, else at least 3 and at most
        ``clients-per-round``.
    ``secagg-threshold``
        shares needed to reconstruct a secret (a dropped device's masks, a surviving device's
        self-mask); 0 (default): a majority of the shares (at least 2), else at least 2, below
        ``secagg-shares`` when that is set and at most the cohort.
    ``secagg-clipping-range``
        every coordinate of an update is clipped to ``[-r, r]`` before quantisation; omitted
        (default): the round's clip bound ``C`` (a coordinate of a clipped update never exceeds
        it, so nothing more is clipped).
    ``secagg-quantization-range``
        ``Q``: a coordinate becomes an integer in ``[0, Q]`` (stochastic rounding, step
        ``2 r / Q``); default 2**22.
    ``secagg-modulus``
        the masks' modulus ``M`` (a power of 2, at most 2**32); default 2**32. The cohort's sum
        of quantised updates must stay below it: ``clients-per-round * Q < M``, so an honest
        cohort's sum never wraps around.

    The in-process and Ray backends ignore this section (they run no network protocol).
    """

    secure_aggregation: bool = False
    secagg_shares: int = 0
    secagg_threshold: int = 0
    secagg_clipping_range: float | None = None
    secagg_quantization_range: int = 2**22
    secagg_modulus: int = 2**32

    def __post_init__(self) -> None:
        if self.secagg_shares != 0 and self.secagg_shares < 3:
            raise ScenarioError(
                f"must be 0 (every member of the cohort) or >= 3, got {self.secagg_shares!r}", key="secagg-shares"
            )
        if self.secagg_threshold != 0 and self.secagg_threshold < 2:
            raise ScenarioError(
                f"must be 0 (a majority of the shares) or >= 2, got {self.secagg_threshold!r}", key="secagg-threshold"
            )
        if self.secagg_shares and self.secagg_threshold >= self.secagg_shares:
            raise ScenarioError(
                f"must be < secagg-shares ({self.secagg_shares}), got {self.secagg_threshold!r}", key="secagg-threshold"
            )
        if self.secagg_clipping_range is not None:
            _positive("secagg-clipping-range", self.secagg_clipping_range)
        q, m = self.secagg_quantization_range, self.secagg_modulus
        if not 2 <= q <= 2**30:
            raise ScenarioError(f"must be an integer in [2, 2**30], got {q!r}", key="secagg-quantization-range")
        if m <= 0 or m & (m - 1) or m > 2**32:
            raise ScenarioError(f"must be a power of 2, at most 2**32 (4294967296), got {m!r}", key="secagg-modulus")
        if m <= q:
            raise ScenarioError(f"must be > secagg-quantization-range ({q}), got {m!r}", key="secagg-modulus")


@dataclass(frozen=True)
class Scenario:
    """A whole, validated scenario."""

    name: str
    seed: int = 0
    rounds: int = 10
    clients_per_round: int = 10
    output_dir: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    log: LogConfig = field(default_factory=LogConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ScenarioError(f"must be a non-empty name of letters, digits, '-', '_', '.', got {self.name!r}", key="name")
        _at_least("seed", self.seed, 0)
        _at_least("rounds", self.rounds, 1)
        if self.rounds > MAX_ROUNDS:
            raise ScenarioError(f"must be <= {MAX_ROUNDS} (10**7), got {self.rounds!r}", key="rounds")
        _at_least("clients-per-round", self.clients_per_round, 1)
        if self.data.num_devices is not None and self.clients_per_round > self.data.num_devices:
            raise ScenarioError(
                f"must be <= data.num-devices ({self.data.num_devices}), got {self.clients_per_round}",
                key="clients-per-round",
            )
        _check_canary_capacity(self)
        _check_secure_aggregation(self)
        if not self.output_dir:
            object.__setattr__(self, "output_dir", f"runs/{self.name}")

    @property
    def base_dir(self) -> Path:
        """Directory relative paths in the scenario (plug-in files) are resolved against."""
        return Path(self.source).parent if self.source else Path.cwd()

    def to_dict(self) -> dict[str, Any]:
        """The resolved scenario as a kebab-case TOML-ready dict (``None`` values omitted).

        Plug-ins named by a relative file path (``../scripts/x.py:Class``) are written with the
        absolute path they resolved to, so the dict (``config.toml``) loads from anywhere.
        """
        out = _to_toml_dict(self)
        for section, key in (("strategy", "name"), ("client", "trainer"), ("model", "name"), ("data", "dataset")):
            out[section][key] = _resolved_plugin(out[section][key], self.base_dir)
        for (section, key), applies in _APPLIES_WHEN.items():
            if section in out and key in out[section] and not applies(self):
                del out[section][key]
        key_file = out.get("privacy", {}).get("noise-key-file")
        if key_file:
            out["privacy"]["noise-key-file"] = str(self.noise_key_path)
        if "prior-runs" in out.get("privacy", {}):
            out["privacy"]["prior-runs"] = [str(p) for p in self.prior_run_paths]
        return out

    @property
    def prior_run_paths(self) -> list[Path]:
        """``[privacy] prior-runs`` resolved against :attr:`base_dir`."""
        out = []
        for run in self.privacy.prior_runs:
            path = Path(run).expanduser()
            out.append(path if path.is_absolute() else (self.base_dir / path).resolve())
        return out

    @property
    def noise_key_path(self) -> Path | None:
        """``[privacy] noise-key-file`` resolved against :attr:`base_dir` (``None`` when unset)."""
        if not self.privacy.noise_key_file:
            return None
        path = Path(self.privacy.noise_key_file).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()


def _check_secure_aggregation(scenario: Scenario) -> None:
    """``[flower]``'s SecAgg+ parameters against the cohort (``clients-per-round``)."""
    fl, n = scenario.flower, scenario.clients_per_round
    if not fl.secure_aggregation:
        return
    if n < 2:
        raise ScenarioError(
            f"secure aggregation needs a cohort of at least 2 (the sum of one update is the update), got {n}",
            key="clients-per-round",
        )
    if fl.secagg_shares > n:
        raise ScenarioError(f"must be <= the cohort (clients-per-round = {n}), got {fl.secagg_shares}", key="flower.secagg-shares")
    if fl.secagg_threshold > n:
        raise ScenarioError(
            f"must be <= the cohort (clients-per-round = {n}), got {fl.secagg_threshold}", key="flower.secagg-threshold"
        )
    q, m = fl.secagg_quantization_range, fl.secagg_modulus
    if n * q >= m:
        raise ScenarioError(
            f"the cohort's sum of quantised updates would wrap around: clients-per-round ({n}) x "
            f"secagg-quantization-range ({q}) must be < secagg-modulus ({m}); lower the quantization range",
            key="flower.secagg-modulus",
        )


def check_canaries_fit_population(canaries: int, devices: int) -> None:
    """Canaries must not outnumber the real devices (``ScenarioError`` on ``audit.canaries``)."""
    if canaries > devices:
        raise ScenarioError(
            f"{canaries} canaries cannot be carried by a population of {devices} devices "
            f"(canaries are extra devices under the same limits; at most {devices}, the number of real devices)",
            key="audit.canaries",
        )


def _check_canary_capacity(scenario: Scenario) -> None:
    """Canaries are extra devices: they must not outnumber the real devices, and all of them
    must fit, at least once each, into half of the run's cohort slots (``rounds`` x
    ``clients-per-round``), so that real devices keep the majority of every run's updates."""
    n = scenario.audit.canaries
    if n == 0:
        return
    if scenario.engine.backend == "flower":
        raise ScenarioError(
            "canary clients run with the in-process and Ray backends; the Flower bridge does not insert them "
            "(set audit.canaries = 0 or engine.backend = \"inprocess\")",
            key="audit.canaries",
        )
    devices = scenario.data.num_devices  # None: the dataset's own users (checked when it is loaded)
    if devices is not None:
        check_canaries_fit_population(n, devices)
    slots = scenario.rounds * scenario.clients_per_round
    if n > slots // 2:
        raise ScenarioError(
            f"{n} canaries do not fit: the run has {scenario.rounds} x {scenario.clients_per_round} = {slots} "
            f"cohort slots and canaries may take at most half of them (at most {slots // 2} canaries)",
            key="audit.canaries",
        )


#: Keys that only mean something in some settings: :meth:`Scenario.to_dict` (hence a run's
#: ``config.toml``) leaves them out elsewhere, so a digits run does not list the synthetic data's
#: ``num-features = 784`` beside a model with 64 inputs. Loading the dict back gives the same
#: scenario (the left-out keys take their defaults, which nothing reads).
_APPLIES_WHEN: dict[tuple[str, str], Any] = {
    ("data", "examples-per-device"): lambda sc: sc.data.dataset == "synthetic",
    ("data", "num-features"): lambda sc: sc.data.dataset == "synthetic",
    ("data", "num-classes"): lambda sc: sc.data.dataset == "synthetic",
    ("data", "partitioner"): lambda sc: sc.data.dataset != "synthetic",
    ("data", "test-fraction"): lambda sc: sc.data.dataset != "synthetic",
    ("data", "alpha"): lambda sc: sc.data.dataset != "synthetic" and sc.data.partitioner == "dirichlet",
    ("population", "check-in-prob"): lambda sc: sc.population.availability != "always",
    ("population", "period"): lambda sc: sc.population.availability == "diurnal",
    ("population", "amplitude"): lambda sc: sc.population.availability == "diurnal",
    ("privacy", "run-id"): lambda sc: bool(sc.privacy.run_id),
    ("privacy", "prior-runs"): lambda sc: bool(sc.privacy.prior_runs),
    ("privacy", "equivalent-cohort"): lambda sc: bool(sc.privacy.equivalent_cohort),
    ("privacy", "equivalent-population"): lambda sc: bool(sc.privacy.equivalent_population),
    ("engine", "ray-address"): lambda sc: sc.engine.backend == "ray",
    ("engine", "ray-workers"): lambda sc: sc.engine.backend == "ray",
    ("log", "mlflow-uri"): lambda sc: sc.log.mlflow,
    ("log", "mlflow-experiment"): lambda sc: sc.log.mlflow,
    **{("flower", key): (lambda sc: sc.flower.secure_aggregation) for key in (
        "secagg-shares", "secagg-threshold", "secagg-clipping-range", "secagg-quantization-range", "secagg-modulus"
    )},
}


def _resolved_plugin(name: str, base_dir: Path) -> str:
    from fedsim.data.files import is_data_file

    if is_data_file(name):  # a data file, relative to the scenario's directory first
        try:
            candidate = base_dir / name
            if not Path(name).is_absolute() and candidate.exists():
                return str(candidate.resolve())
        except (OSError, ValueError):
            pass
        return name
    target, sep, attr = name.rpartition(":")
    if not sep or not target.endswith(".py") or Path(target).is_absolute():
        return name
    try:
        candidate = base_dir / target
        if candidate.exists():
            return f"{candidate.resolve()}:{attr}"
    except (OSError, ValueError):
        pass
    return name


def _to_toml_dict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name == "source":
            continue
        value = getattr(obj, f.name)
        if value is None:
            continue
        if f.name == "params":
            out.update({_kebab(k): list(v) if isinstance(v, tuple) else v for k, v in value.items()})
        elif dataclasses.is_dataclass(value):
            nested[_kebab(f.name)] = _to_toml_dict(value)
        else:
            out[_kebab(f.name)] = list(value) if isinstance(value, tuple) else value
    out.update(nested)  # tables after plain keys
    return out


# --------------------------------------------------------------------------------------------
# building from raw TOML tables

_OPEN_SECTIONS = {
    ClientConfig: {"trainer", "local_epochs", "batch_size", "lr"},
    StrategyConfig: {"name"},
    # [data] / [model]: keys other than fedsim's own are the loader's / builder's parameters
    DataConfig: {f.name for f in dataclasses.fields(DataConfig) if f.name != "params"},
    ModelConfig: {"name", "hidden", "init", "init_sha256"},
}


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ScenarioError(f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}", key=key)
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], key)
    if hint is bool:
        _checked(boolean, key, value)
        return value
    if hint is int:
        if not is_int(value):
            raise ScenarioError(f"must be an integer, got {value!r}", key=key)
        return value
    if hint is float:
        if not is_number(value):
            raise ScenarioError(f"must be a number, got {value!r}", key=key)
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ScenarioError(f"must be a finite number, got {value!r}", key=key)
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ScenarioError(f"must be a string, got {value!r}", key=key)
        return value
    if origin in (tuple, list, collections.abc.Sequence) and typing.get_args(hint):
        item = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise ScenarioError(f"must be a list, got {value!r}", key=key)
        items = [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is not list else items
    return value


def _build(cls: type, table: Any, prefix: str) -> Any:
    if not isinstance(table, dict):
        raise ScenarioError(f"must be a table ([{prefix.rstrip('.')}]), got {table!r}", key=prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("source", "params")}
    open_keys = _OPEN_SECTIONS.get(cls)
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for raw_key, value in table.items():
        name = raw_key.replace("-", "_")
        key = prefix + raw_key
        if name not in fields:
            if open_keys is not None:
                extra[name] = value
                continue
            raise ScenarioError(unknown_key_message(raw_key, (_kebab(n) for n in fields)), key=key)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key + ".")
        else:
            kwargs[name] = _check_type(value, hint, key)
    if open_keys is not None:
        kwargs["params"] = extra
    try:
        return cls(**kwargs)
    except ScenarioError as exc:
        if exc.key and not exc.key.startswith(prefix):
            raise ScenarioError(exc.message, key=prefix + exc.key, source=exc.source) from None
        raise


def _validate_plugin_params(scenario: Scenario) -> None:
    """Check the strategy's and the trainer's parameters before anything runs.

    A plug-in with a ``Params`` dataclass (:func:`fedsim.registry.params_class`) gets its
    section mapped onto the fields (names, annotated types, the dataclass's own value checks);
    one without is checked against its constructor's signature, as a user's plain class.
    """
    from fedsim.client import TRAINERS, ClientTrainer
    from fedsim.registry import UnknownPluginError, params_class
    from fedsim.strategy import STRATEGIES, Strategy

    for registry, section, name, params, base in (
        (STRATEGIES, "strategy", scenario.strategy.name, scenario.strategy.params, Strategy),
        (TRAINERS, "client", scenario.client.trainer, scenario.client.params, ClientTrainer),
    ):
        key_name = "strategy.name" if section == "strategy" else "client.trainer"
        try:
            cls = registry.get(name, base_dir=scenario.base_dir)
        except UnknownPluginError as exc:
            raise ScenarioError(str(exc), key=key_name) from None
        except Exception as exc:  # a plug-in path that cannot be imported or executed
            raise ScenarioError(f"cannot load {name!r}: {type(exc).__name__}: {exc}", key=key_name) from None
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ScenarioError(f"{name!r} is not a {base.__name__} subclass", key=key_name)
        what = f"{'trainer' if section == 'client' else 'strategy'} {name!r}"
        own = _OPEN_SECTIONS[ClientConfig if section == "client" else StrategyConfig]
        typed = params_class(cls)
        if typed is not None:
            values = _typed_plugin_params(typed, params, section, what, own)
        else:
            skip = {"self", "model"} if section == "client" else {"self"}
            values = _signature_plugin_params(cls, params, section, what, own, skip)
        if section == "client":
            params.update(values)  # trainers get the checked values (config.toml records them)
        else:
            _check_strategy_for_run(cls, values, scenario.rounds)
            _check_equivalent(scenario, cls, values)


def _typed_plugin_params(typed: type, params: dict[str, Any], section: str, what: str, own: set[str]) -> dict[str, Any]:
    """``params`` mapped onto the ``Params`` dataclass ``typed``: names, types, then its checks.

    An :class:`~fedsim.registry.OpenParams` also takes the keys of its options (a DP strategy's
    mechanism options), typed by :meth:`~fedsim.registry.OpenParams.option_hints`.
    """
    from fedsim.registry import OpenParams

    is_open = issubclass(typed, OpenParams)
    fields = {f.name: f for f in dataclasses.fields(typed) if f.init and not (is_open and f.name == "options")}
    option_hints = typed.option_hints(params) if is_open else {}
    for pname in params:
        if pname not in fields and pname not in option_hints:
            raise ScenarioError(
                unknown_key_message(
                    _kebab(pname), (_kebab(k) for k in own), extra={f"parameters of {what}": (_kebab(n) for n in [*fields, *option_hints])}
                ),
                key=f"{section}.{_kebab(pname)}",
            )
    missing = [
        n for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in params
    ]
    if missing:
        raise ScenarioError(f"{what} needs parameter(s): {', '.join(_kebab(m) for m in missing)}", key=section)
    try:
        hints = typing.get_type_hints(typed)
    except Exception as exc:  # a user's Params whose annotations do not resolve
        raise ScenarioError(f"{what}: cannot read the types of {typed.__name__}: {type(exc).__name__}: {exc}", key=section) from None
    hints = {**option_hints, **hints}
    values = {n: _check_type(v, hints[n], f"{section}.{_kebab(n)}") if n in hints else v for n, v in params.items()}
    try:
        typed.from_keywords(values) if is_open else typed(**values)  # the dataclass's own value checks
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise ScenarioError(str(exc), key=section) from None
    return values


def _signature_plugin_params(
    cls: type, params: dict[str, Any], section: str, what: str, own: set[str], skip: set[str]
) -> dict[str, Any]:
    """``params`` checked against ``cls.__init__``: names, required ones, annotated types."""
    sig = inspect.signature(cls.__init__)
    accepted = {n: p for n, p in sig.parameters.items() if n not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    values = dict(params)
    _check_plugin_values(cls.__init__, values, accepted, takes_any, section, what, own)
    return values


def _check_strategy_for_run(cls: type, values: dict[str, Any], rounds: int) -> None:
    """Build the strategy once: its ``__init__`` validates what its ``Params`` cannot (a class
    without ``Params`` validates everything there), and a strategy that solves its noise from a
    target (``target-rho``) does so now, so a target that no noise multiplier reaches fails
    before the run (with the mechanism's own checks: options it does not take, its limits)."""
    try:
        cls(**values).calibrated_noise_multiplier(num_rounds=rounds)
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise ScenarioError(str(exc), key="strategy") from None


def _check_equivalent(scenario: Scenario, cls: type, values: dict[str, Any]) -> None:
    """``[privacy] equivalent-cohort``: only for a DP strategy built on a mechanism, and a
    deployment the run can stand for (:func:`fedsim.privacy.equivalent.check_deployment`)."""
    from fedsim.strategy import MechanismStrategy

    cfg = scenario.privacy
    if not cfg.equivalent_cohort:
        return
    if not issubclass(cls, MechanismStrategy):
        raise ScenarioError(
            f"= {cfg.equivalent_cohort} needs a DP strategy that adds noise through a mechanism "
            f"(dp-ftrl, dp-fedavg), not strategy {scenario.strategy.name!r}; leave it out (0) for this strategy",
            key="privacy.equivalent-cohort",
        )
    try:
        cls(**values).set_equivalent(
            equivalent_deployment(scenario), clients_per_round=scenario.clients_per_round, num_rounds=scenario.rounds
        )
    except ValueError as exc:
        raise ScenarioError(str(exc), key="privacy") from None


def equivalent_deployment(scenario: Scenario) -> Any:
    """The scenario's :class:`~fedsim.privacy.equivalent.Deployment` (``None`` when
    ``[privacy] equivalent-cohort`` is 0)."""
    from fedsim.privacy.equivalent import Deployment

    cfg = scenario.privacy
    if not cfg.equivalent_cohort:
        return None
    return Deployment(cfg.equivalent_cohort, cfg.equivalent_population or None)


def _check_plugin_values(
    fn: Any, params: dict[str, Any], accepted: dict[str, Any], takes_any: bool, section: str, what: str, fixed: set[str]
) -> None:
    """Names and annotated types of a loader's / builder's ``[section]`` parameters; converts in place."""
    for pname in params:
        if pname not in accepted and not takes_any:
            raise ScenarioError(
                unknown_key_message(
                    _kebab(pname), (_kebab(n) for n in fixed), extra={f"parameters of {what}": (_kebab(n) for n in accepted)}
                ),
                key=f"{section}.{_kebab(pname)}",
            )
    missing = [n for n, p in accepted.items() if p.default is inspect.Parameter.empty and n not in params]
    if missing:
        raise ScenarioError(f"{what} needs parameter(s): {', '.join(_kebab(m) for m in missing)}", key=section)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations in a user's plug-in: names are still checked
        hints = {}
    for pname, value in list(params.items()):
        hint = hints.get(pname)
        if hint is not None and pname in accepted:
            params[pname] = _check_type(value, hint, f"{section}.{_kebab(pname)}")


def _validate_data_and_model(scenario: Scenario) -> None:
    """``[data] dataset`` and ``[model] name`` resolve, and their parameters fit the signatures."""
    from fedsim.data.loaders import loader_parameters, resolve_loader
    from fedsim.models import IGNORES_HIDDEN, MODELS, builder_parameters
    from fedsim.registry import UnknownPluginError

    data, model = scenario.data, scenario.model
    data_fixed = {f.name for f in dataclasses.fields(DataConfig) if f.name != "params"}
    try:
        loader = resolve_loader(data.dataset, scenario.base_dir)
    except UnknownPluginError as exc:
        raise ScenarioError(f"{exc}, or a data file (.npz, .csv, .jsonl)", key="data.dataset") from None
    except Exception as exc:
        raise ScenarioError(f"cannot load {data.dataset!r}: {type(exc).__name__}: {exc}", key="data.dataset") from None
    if dataset_traits(data.dataset).data_keys:  # built from [data]'s own keys
        names, required, takes_any = set(), set(), False
    else:
        try:
            names, required, takes_any = loader_parameters(loader)
        except (TypeError, ValueError) as exc:
            raise ScenarioError(f"{data.dataset!r} has no inspectable signature: {exc}", key="data.dataset") from None
    accepted = {n: inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=(inspect.Parameter.empty if n in required else None)) for n in names}
    _check_plugin_values(loader, data.params, accepted, takes_any, "data", f"dataset {data.dataset!r}", data_fixed)

    try:
        builder = MODELS.get(model.name, base_dir=scenario.base_dir)
    except UnknownPluginError as exc:
        raise ScenarioError(str(exc).replace("'package.module:Class'", "'package.module:build' or 'file.py:build'"), key="model.name") from None
    except Exception as exc:
        raise ScenarioError(f"cannot load {model.name!r}: {type(exc).__name__}: {exc}", key="model.name") from None
    if not callable(builder):
        raise ScenarioError(f"{model.name!r} is not callable (a builder build(spec, **params) -> nn.Module)", key="model.name")
    try:
        named, takes_any = builder_parameters(builder)
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{model.name!r} has no inspectable signature: {exc}", key="model.name") from None
    given = dict(model.params)
    if model.hidden is not None and model.name not in IGNORES_HIDDEN:
        if "hidden" not in named and not takes_any:
            raise ScenarioError(f"model {model.name!r} takes no parameter 'hidden'; its parameters: "
                                f"{', '.join(sorted(_kebab(n) for n in named)) or '(none)'}", key="model.hidden")
        given["hidden"] = model.hidden
    _check_plugin_values(builder, given, named, takes_any, "model", f"model {model.name!r}", _OPEN_SECTIONS[ModelConfig])
    given.pop("hidden", None)
    model.params.update(given)


#: Strategy parameters that exclude each other: a value given for one (an override, a sweep's
#: grid) replaces the scenario's value of the other.
EXCLUSIVE_STRATEGY_PARAMS = {"noise-multiplier": "target-rho", "target-rho": "noise-multiplier"}


def strategy_parameters(name: str, base_dir: Path) -> set[str] | None:
    """The kebab-case parameters strategy ``name`` takes (its ``Params`` fields, else its
    constructor's); ``None`` when it takes any keyword or cannot be loaded (the scenario check
    then reports the name)."""
    from fedsim.registry import parameter_names
    from fedsim.strategy import STRATEGIES

    try:
        names = parameter_names(STRATEGIES.get(name, base_dir=base_dir))
    except Exception:  # an unknown or broken plug-in: validation names it, with the key
        return None
    return None if names is None else {_kebab(n) for n in names}


def replace_strategy_params(
    table: dict[str, Any], given: dict[str, Any], base_dir: Path, *, drop_given: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """A ``[strategy]`` table with ``given`` parameters set, minus those of the strategy it replaced.

    ``given`` (kebab-case keys, ``name`` among them or not) comes from an override (``--set``,
    :func:`fedsim.run`'s ``overrides``) or a sweep's configuration. Dropped from ``table``:

    * parameters that the resulting strategy does not take, when ``given`` names the strategy
      (they belong to the strategy it replaced: ``noise-multiplier`` when ``fedavg`` replaces
      ``dp-ftrl``);
    * the other one of an exclusive pair (:data:`EXCLUSIVE_STRATEGY_PARAMS`): a given
      ``noise-multiplier`` replaces the table's ``target-rho`` and vice versa.

    Keys of ``given`` itself are kept (validation then reports one the strategy does not take),
    unless ``drop_given``: a sweep's grid crosses strategies with their parameters and leaves a
    value out of the configurations whose strategy does not take it.

    Returns
    -------
    tuple
        The new table and the dropped keys (sorted; empty when nothing changed).
    """
    out = {**table, **given}
    dropped: set[str] = set()
    for key in given:
        other = EXCLUSIVE_STRATEGY_PARAMS.get(key)
        if other is not None and other in out and other not in given:
            del out[other]
            dropped.add(other)
    if "name" in given or drop_given:
        accepted = strategy_parameters(str(out.get("name", "fedavg")), base_dir)
        if accepted is not None:
            for key in list(out):
                if key != "name" and key not in accepted and (drop_given or key not in given):
                    del out[key]
                    dropped.add(key)
    return out, sorted(dropped)


def _replace_strategy(raw: dict[str, Any], overrides: list[Override], base_dir: Path) -> None:
    """Overrides of ``[strategy]`` keys applied to ``raw`` the way :func:`replace_strategy_params`
    says; one :class:`~fedsim.errors.ScenarioNote` names what was dropped."""
    given = {o[0][1]: o[1] for o in overrides if len(o[0]) == 2 and o[0][0] == "strategy"}
    table = raw.get("strategy", {})
    if not given or not isinstance(table, dict):
        return
    before = str(table.get("name", "fedavg"))
    table, dropped = replace_strategy_params(table, given, base_dir)
    raw["strategy"] = table
    if not dropped:
        return
    name = str(table.get("name", "fedavg"))
    if name != before:
        why = f"strategy.name = {name!r} replaces {before!r}; its parameters that {name!r} does not take are left out"
    else:
        why = "left out in favour of the overridden " + ", ".join(
            f"strategy.{k}" for k in given if EXCLUSIVE_STRATEGY_PARAMS.get(k) in dropped
        )
    warnings.warn(ScenarioNote(f"{why}: {', '.join(f'strategy.{k}' for k in dropped)}"), stacklevel=3)


def _validate_init(scenario: Scenario) -> None:
    """``[model] init``: the file exists and holds a model; the scenario records its absolute path
    and SHA-256 (a given ``init-sha256`` must match). Its names and shapes are checked against
    the model when the run builds it (:func:`fedsim.models.load_initial_model`)."""
    from fedsim.models import ModelError, read_initial_model

    model = scenario.model
    if model.init is None:
        return
    path = Path(model.init).expanduser()
    if not path.is_absolute():
        candidate = scenario.base_dir / path
        path = candidate if candidate.exists() else path
    try:
        init = read_initial_model(path.resolve())
    except ModelError as exc:
        raise ScenarioError(str(exc), key="model.init") from None
    if model.init_sha256 is not None and model.init_sha256 != init.sha256:
        raise ScenarioError(
            f"{init.path} has SHA-256 {init.sha256}, the scenario's init-sha256 is {model.init_sha256}: "
            "the file changed since the scenario recorded it",
            key="model.init-sha256",
        )
    object.__setattr__(model, "init", str(init.path))
    object.__setattr__(model, "init_sha256", init.sha256)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``--set key.sub=value``; the value is read as TOML (``0.1``, ``true``, ``"x"``), else a string."""
    if "=" not in text:
        raise ScenarioError(f"--set expects key=value, got {text!r}", source="--set")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ScenarioError(f"--set expects a dotted key like client.lr, got {key!r}", source="--set")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


#: One override: ``(path, value)`` from ``--set``, or ``(path, value, flag)`` from a dedicated
#: command-line flag (``(["rounds"], 5, "--rounds")``): errors in it then name that flag.
Override = tuple[list[str], Any] | tuple[list[str], Any, str]


def scenario_from_dict(
    raw: dict[str, Any], *, source: str | None = None, overrides: list[Override] | None = None
) -> Scenario:
    """Validate a raw (TOML-decoded) scenario dict, applying dotted overrides first.

    An error in an overridden value is attributed to ``--set`` (or to the override's own flag,
    for three-element overrides), an error elsewhere to ``source``.
    """
    raw = copy.deepcopy(raw)
    overridden: set[str] = set()
    flags: dict[str, str] = {}
    for override in overrides or []:
        path, value = override[0], override[1]
        if len(override) > 2:
            flags[".".join(path)] = override[2]  # type: ignore[misc]
        table = raw
        for part in path[:-1]:
            nxt = table.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ScenarioError(f"{'.'.join(path)}: {part!r} is not a table", source="--set")
            table = nxt
        if not (len(path) == 2 and path[0] == "strategy"):
            table[path[-1]] = value
        overridden.add(".".join(path))
    _replace_strategy(raw, list(overrides or []), Path(source).parent if source else Path.cwd())
    try:
        raw.setdefault("name", Path(source).stem if source else "scenario")
        scenario = _build(Scenario, raw, "")
        scenario = dataclasses.replace(scenario, source=source)
        _validate_plugin_params(scenario)
        _validate_data_and_model(scenario)
        _validate_init(scenario)
        return scenario
    except ScenarioError as exc:
        # an error on a whole section (a strategy's constructor refusing a value) is the
        # override's when an override touched that section
        if exc.key in flags:  # a dedicated flag (--rounds -5): name the flag the user typed
            raise ScenarioError(exc.message, source=flags[exc.key]) from None
        from_override = exc.key in overridden or any(k.startswith(f"{exc.key}.") for k in overridden)
        origin = "--set" if from_override else source
        raise exc.with_source(origin) if origin else exc from None


def load_scenario(path: str | Path, overrides: list[Override] | None = None) -> Scenario:
    """Read and validate a scenario TOML file."""
    path = Path(path)
    if not path.exists():
        raise ScenarioError("scenario file not found", source=str(path))
    if not path.is_file():
        raise ScenarioError("is not a file", source=str(path))
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"invalid TOML: {exc}", source=str(path)) from None
    except UnicodeDecodeError:
        raise ScenarioError("is not UTF-8 text", source=str(path)) from None
    except RecursionError:
        raise ScenarioError("invalid TOML: nested too deeply", source=str(path)) from None
    except OSError as exc:
        raise ScenarioError(f"cannot read: {exc.strerror or exc}", source=str(path)) from None
    return scenario_from_dict(raw, source=str(path), overrides=overrides)
