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
    # any other key here is a parameter of the strategy's constructor (kebab-case)

The strategy's (and trainer's) own parameters are checked against its constructor signature when
the scenario is loaded, so a typo fails before the run starts.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedsim.errors import ScenarioError

# --------------------------------------------------------------------------------------------
# validation helpers: each names the field it checks


def _positive(name: str, value: float | int) -> None:
    if not value > 0:
        raise ScenarioError(f"must be > 0, got {value!r}", key=name)


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ScenarioError(f"must be >= {low}, got {value!r}", key=name)


def _in_open_unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ScenarioError(f"must be in (0, 1), got {value!r}", key=name)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


# --------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: dataset, held-out split and partitioning across devices."""

    dataset: Literal["digits", "synthetic"] = "digits"
    num_devices: int = 100
    partitioner: Literal["iid", "dirichlet"] = "iid"
    alpha: float = 0.5
    test_fraction: float = 0.2
    # synthetic only
    examples_per_device: int = 64
    num_features: int = 784
    num_classes: int = 10

    def __post_init__(self) -> None:
        _at_least("num-devices", self.num_devices, 1)
        _positive("alpha", self.alpha)
        _in_open_unit("test-fraction", self.test_fraction)
        _at_least("examples-per-device", self.examples_per_device, 1)
        _at_least("num-features", self.num_features, 1)
        _at_least("num-classes", self.num_classes, 2)
        if self.dataset == "digits" and self.num_devices > 1437:
            raise ScenarioError(
                f"the digits training split has 1437 examples, cannot serve {self.num_devices} devices "
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
        if not 0.0 < self.check_in_prob <= 1.0:
            raise ScenarioError(f"must be in (0, 1], got {self.check_in_prob!r}", key="check-in-prob")
        _at_least("period", self.period, 1)
        if not 0.0 <= self.amplitude <= 1.0:
            raise ScenarioError(f"must be in [0, 1], got {self.amplitude!r}", key="amplitude")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the model every client trains."""

    name: Literal["logreg", "mlp"] = "mlp"
    hidden: int = 64

    def __post_init__(self) -> None:
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
    """``[privacy]``: reporting delta and an optional budget that stops the run."""

    delta: float = 1e-6
    max_rho: float | None = None
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        _in_open_unit("delta", self.delta)
        if self.max_rho is not None:
            _positive("max-rho", self.max_rho)
        if self.max_epsilon is not None:
            _positive("max-epsilon", self.max_epsilon)


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
    #: backend = "ray": cluster address ("" = this process's Ray runtime or a new local one)
    ray_address: str = ""
    #: backend = "ray": number of workers (0 = one per CPU the Ray cluster reports)
    ray_workers: int = 0

    def __post_init__(self) -> None:
        _at_least("chunk-size", self.chunk_size, 1)
        _at_least("threads", self.threads, 1)
        _at_least("eval-every", self.eval_every, 1)
        _positive("max-update-norm", self.max_update_norm)
        _at_least("ray-workers", self.ray_workers, 0)


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
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ScenarioError(f"must be a non-empty name of letters, digits, '-', '_', '.', got {self.name!r}", key="name")
        _at_least("seed", self.seed, 0)
        _at_least("rounds", self.rounds, 1)
        _at_least("clients-per-round", self.clients_per_round, 1)
        if self.clients_per_round > self.data.num_devices:
            raise ScenarioError(
                f"must be <= data.num-devices ({self.data.num_devices}), got {self.clients_per_round}",
                key="clients-per-round",
            )
        _check_canary_capacity(self)
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
        for section, key in (("strategy", "name"), ("client", "trainer")):
            out[section][key] = _resolved_plugin(out[section][key], self.base_dir)
        return out


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
    devices = scenario.data.num_devices
    if n > devices:
        raise ScenarioError(
            f"{n} canaries cannot be carried by a population of {devices} devices "
            f"(canaries are extra devices under the same limits; at most data.num-devices = {devices})",
            key="audit.canaries",
        )
    slots = scenario.rounds * scenario.clients_per_round
    if n > slots // 2:
        raise ScenarioError(
            f"{n} canaries do not fit: the run has {scenario.rounds} x {scenario.clients_per_round} = {slots} "
            f"cohort slots and canaries may take at most half of them (at most {slots // 2} canaries)",
            key="audit.canaries",
        )


def _resolved_plugin(name: str, base_dir: Path) -> str:
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
            out.update({_kebab(k): v for k, v in value.items()})
        elif dataclasses.is_dataclass(value):
            nested[_kebab(f.name)] = _to_toml_dict(value)
        else:
            out[_kebab(f.name)] = value
    out.update(nested)  # tables after plain keys
    return out


# --------------------------------------------------------------------------------------------
# building from raw TOML tables

_OPEN_SECTIONS = {ClientConfig: {"trainer", "local_epochs", "batch_size", "lr"}, StrategyConfig: {"name"}}


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
        if not isinstance(value, bool):
            raise ScenarioError(f"must be true or false, got {value!r}", key=key)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"must be an integer, got {value!r}", key=key)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
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
            allowed = ", ".join(sorted(_kebab(n) for n in fields))
            raise ScenarioError(f"unknown key; allowed keys: {allowed}", key=key)
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
    """Check strategy/trainer parameters against their constructors (no run needed)."""
    from fedsim.client import TRAINERS, ClientTrainer
    from fedsim.registry import UnknownPluginError
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
        skip = {"self", "model"} if section == "client" else {"self"}
        sig = inspect.signature(cls.__init__)
        accepted = {p for p in sig.parameters if p not in skip and sig.parameters[p].kind is not inspect.Parameter.VAR_KEYWORD}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        for pname in params:
            if pname not in accepted and not takes_any:
                allowed = ", ".join(sorted(_kebab(p) for p in accepted)) or "(none)"
                raise ScenarioError(f"unknown parameter of {section} {name!r}; allowed: {allowed}", key=f"{section}.{_kebab(pname)}")
        missing = [
            p for p in accepted
            if sig.parameters[p].default is inspect.Parameter.empty
            and sig.parameters[p].kind is not inspect.Parameter.VAR_POSITIONAL
            and p not in params
        ]
        if missing:
            raise ScenarioError(f"{section} {name!r} needs parameter(s): {', '.join(_kebab(m) for m in missing)}", key=section)
        if section == "strategy":
            try:
                strategy = cls(**params)  # strategies validate their own values in __init__
                # a strategy that solves its noise from a target (target-rho) does so now, so a
                # target no noise multiplier reaches fails before the run
                calibrate = getattr(strategy, "calibrated_noise_multiplier", None)
                if callable(calibrate):
                    calibrate(num_rounds=scenario.rounds)
            except (ValueError, TypeError, ArithmeticError) as exc:
                raise ScenarioError(str(exc), key="strategy") from None


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


def scenario_from_dict(
    raw: dict[str, Any], *, source: str | None = None, overrides: list[tuple[list[str], Any]] | None = None
) -> Scenario:
    """Validate a raw (TOML-decoded) scenario dict, applying dotted overrides first."""
    raw = copy.deepcopy(raw)
    overridden: set[str] = set()
    for path, value in overrides or []:
        table = raw
        for part in path[:-1]:
            nxt = table.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ScenarioError(f"{'.'.join(path)}: {part!r} is not a table", source="--set")
            table = nxt
        table[path[-1]] = value
        overridden.add(".".join(path))
    try:
        raw.setdefault("name", Path(source).stem if source else "scenario")
        scenario = _build(Scenario, raw, "")
        scenario = dataclasses.replace(scenario, source=source)
        _validate_plugin_params(scenario)
        return scenario
    except ScenarioError as exc:
        # an error on a whole section (a strategy's constructor refusing a value) is the
        # override's when an override touched that section
        from_override = exc.key in overridden or any(k.startswith(f"{exc.key}.") for k in overridden)
        origin = "--set" if from_override else source
        raise exc.with_source(origin) if origin else exc from None


def load_scenario(path: str | Path, overrides: list[tuple[list[str], Any]] | None = None) -> Scenario:
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
