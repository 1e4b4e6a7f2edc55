"""Typed plug-in parameters: a section's kebab-case keys mapped onto a plug-in's ``Params`` dataclass.

Built-in strategies and trainers declare ``Params``; a user plug-in may (typed checks) or may not
(its constructor's signature is checked, as before). Every error is one line naming the file
and the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from clients.opacus_trainer import OpacusParams, OpacusTrainer
from clients.sgd import SGDParams, SGDTrainer
from fedsim.client import TRAINERS
from fedsim.errors import ScenarioError
from fedsim.registry import parameter_names, params_class, resolve_params
from fedsim.scenario import load_scenario
from fedsim.strategy import STRATEGIES
from fedsim.types import TrainConfig
from strategies.dp_fedavg import DPFedAvg, DPFedAvgParams
from strategies.dp_ftrl import DPFTRL, DPFTRLParams
from strategies.fedavg import FedAvg, FedAvgParams

from ..conftest import run_cli

BASE = """
name = "typed"
rounds = 2
clients-per-round = 4
[data]
num-devices = 8
[model]
name = "logreg"
"""

TYPED = '''
from dataclasses import dataclass
from typing import Literal

import torch

from fedsim.strategy import Strategy
from fedsim.validation import positive_number


@dataclass(frozen=True)
class ShrinkParams:
    server_lr: float = 1.0
    shrink: float = 0.5
    mode: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        positive_number("server-lr", self.server_lr)
        if not 0 < self.shrink < 1:
            raise ValueError(f"shrink must be in (0, 1), got {self.shrink!r}")


class Shrink(Strategy):
    Params = ShrinkParams

    def __init__(self, **kwargs) -> None:
        self.params = ShrinkParams(**kwargs)

    def aggregate(self, *, round, params, batch):
        if batch.num_updates == 0:
            return params
        step = batch.delta_sum / batch.weight_sum if self.params.mode == "mean" else batch.delta_sum
        return params + self.params.server_lr * self.params.shrink * step
'''

PLAIN = '''
import torch

from fedsim.strategy import Strategy


class Plain(Strategy):
    def __init__(self, server_lr: float = 1.0, label: str = "x") -> None:
        if not server_lr > 0:
            raise ValueError(f"server-lr must be > 0, got {server_lr!r}")
        self.server_lr = server_lr

    def aggregate(self, *, round, params, batch):
        if batch.num_updates == 0:
            return params
        return params + self.server_lr * batch.delta_sum / batch.weight_sum
'''


def _scenario(tmp_path: Path, strategy: str = "", client: str = "", plugin: str | None = None) -> Path:
    if plugin is not None:
        (tmp_path / "plugin.py").write_text(plugin, encoding="utf-8")
    text = BASE + "[client]\n" + client + "\n[strategy]\n" + strategy + "\n"
    path = tmp_path / "s.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path) -> str:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    return msg[len(f"{path}: "):]


def test_every_builtin_plugin_declares_a_frozen_params_dataclass() -> None:
    for registry in (STRATEGIES, TRAINERS):
        for name in registry.names():
            typed = params_class(registry.get(name))
            assert typed is not None and dataclasses.is_dataclass(typed), name
            assert typed.__dataclass_params__.frozen, name
            typed()  # every field has a default
    assert params_class(DPFTRL) is DPFTRLParams and params_class(SGDTrainer) is SGDParams
    assert parameter_names(FedAvg) == {"server_lr", "server_optimizer", "momentum", "beta1", "beta2", "tau"}
    assert "estimator" in parameter_names(DPFTRL) and "estimator" not in parameter_names(DPFedAvg)


def test_plugins_build_from_params_or_keywords_alike() -> None:
    assert DPFTRL(DPFTRLParams(noise_multiplier=3.0, momentum=0.5)).params == DPFTRL(noise_multiplier=3.0, momentum=0.5).params
    assert FedAvg(FedAvgParams(server_lr=0.5)).server_lr == 0.5 == FedAvg(server_lr=0.5).server_lr
    assert DPFedAvg(DPFedAvgParams(clip_norm=0.3)).clip_norm == 0.3
    with pytest.raises(TypeError, match="not both"):
        DPFTRL(DPFTRLParams(), momentum=0.5)
    with pytest.raises(TypeError, match="expected DPFTRLParams"):
        DPFTRL(DPFedAvgParams())
    with pytest.raises(TypeError):
        FedAvg(server_rate=1.0)
    assert resolve_params(OpacusParams, None, {"max_grad_norm": 2.0}).max_grad_norm == 2.0
    with pytest.raises(ValueError, match="^max-grad-norm must be > 0"):
        OpacusParams(max_grad_norm=0)
    with pytest.raises(ValueError, match="contradicts path = 'vmap'"):
        SGDParams(batched=False, path="vmap")


@pytest.mark.parametrize(
    ("strategy", "client", "key", "needle"),
    [
        # wrong types, caught by the field annotations
        ('name = "dp-ftrl"\nclip-norm = "big"', "", "strategy.clip-norm", "must be a number, got 'big'"),
        ('name = "dp-ftrl"\nmax-participations = 2.5', "", "strategy.max-participations", "must be an integer, got 2.5"),
        ('name = "dp-ftrl"\nestimator = "honaker"', "", "strategy.estimator", "must be one of 'vanilla', 'efficient'"),
        ('name = "dp-fedavg"\nsampling-rate = true', "", "strategy.sampling-rate", "must be a number, got True"),
        ('name = "fedavg"\nserver-lr = inf', "", "strategy.server-lr", "must be a finite number"),
        ('name = "fedavg"', 'batched = 1', "client.batched", "must be true or false, got 1"),
        ('name = "fedavg"', 'path = "fast"', "client.path", "must be one of 'auto', 'batched', 'conv', 'vmap', 'loop', 'measure'"),
        ('name = "fedavg"', 'trainer = "opacus"\ntarget-delta = "small"', "client.target-delta", "must be a number"),
        # values, caught by the dataclass's own checks (the message names the key)
        ('name = "dp-ftrl"\nmomentum = 1.0', "", "strategy", "momentum must be a number in [0, 1), got 1.0"),
        ('name = "dp-ftrl"\nnoise-multiplier = 1.0\ntarget-rho = 0.5', "", "strategy", "give noise-multiplier or target-rho, not both"),
        ('name = "dp-ftrl"\nmechanism = "gaussian"\nestimator = "vanilla"', "", "strategy", "estimator does not apply to mechanism = 'gaussian'"),
        ('name = "dp-fedavg"\nsampling-rate = 0.1', "", "strategy", 'sampling-rate applies only to sampling = "poisson"'),
        ('name = "fedavg"', "workers = 0", "client", "workers must be an integer >= 1 (or omit it), got 0"),
        ('name = "fedavg"', 'batched = false\npath = "vmap"', "client", "contradicts path = 'vmap'"),
        ('name = "fedavg"', 'trainer = "opacus"\nmax-grad-norm = -1', "client", "max-grad-norm must be > 0, got -1"),
    ],
)
def test_bad_builtin_parameters_are_one_line_errors_naming_the_key(
    tmp_path: Path, strategy: str, client: str, key: str, needle: str
) -> None:
    msg = _error(_scenario(tmp_path, strategy, client))
    assert msg.startswith(f"{key}: ") and needle in msg, msg


def test_unknown_parameter_suggests_the_closest_field(tmp_path: Path) -> None:
    msg = _error(_scenario(tmp_path, 'name = "dp-ftrl"\nnoise-multiplyer = 2.0'))
    assert msg.startswith("strategy.noise-multiplyer: unknown key 'noise-multiplyer' (did you mean 'noise-multiplier'?); allowed: name; ")
    assert "parameters of strategy 'dp-ftrl': bands, beta1, beta2, buffers, clip-lr, clip-norm, count-noise-multiplier, count-rho-fraction, estimator, max-participations, mechanism," in msg
    msg = _error(_scenario(tmp_path, 'name = "fedavg"', "worker = 2"))
    assert msg.startswith("client.worker: unknown key 'worker' (did you mean 'workers'?); ")
    assert msg.endswith("parameters of trainer 'sgd': batched, path, pool, workers")


def test_good_parameters_load_typed_and_config_keeps_what_was_written(tmp_path: Path) -> None:
    sc = load_scenario(_scenario(tmp_path, 'name = "dp-ftrl"\nclip-norm = 1\nmax-participations = 2', "workers = 2"))
    assert sc.strategy.params == {"clip_norm": 1, "max_participations": 2}  # as written: config.toml unchanged
    assert sc.to_dict()["strategy"] == {"name": "dp-ftrl", "clip-norm": 1, "max-participations": 2}
    assert sc.client.params == {"workers": 2}
    strategy = STRATEGIES.get(sc.strategy.name)(**sc.strategy.params)  # how the engine builds it
    assert strategy.params == DPFTRLParams(clip_norm=1.0, max_participations=2)
    assert isinstance(strategy.clip_norm, float)


def test_custom_strategy_with_params_gets_typed_validation(tmp_path: Path) -> None:
    name = 'name = "plugin.py:Shrink"'
    ok = load_scenario(_scenario(tmp_path, name + '\nshrink = 0.25\nmode = "sum"', plugin=TYPED))
    assert ok.strategy.params == {"shrink": 0.25, "mode": "sum"}
    assert _error(_scenario(tmp_path, name + '\nshrink = "half"', plugin=TYPED)) == "strategy.shrink: must be a number, got 'half'"
    assert _error(_scenario(tmp_path, name + "\nshrink = 2.0", plugin=TYPED)) == "strategy: shrink must be in (0, 1), got 2.0"
    assert _error(_scenario(tmp_path, name + '\nmode = "median"', plugin=TYPED)) == (
        "strategy.mode: must be one of 'mean', 'sum', got 'median'"
    )
    assert _error(_scenario(tmp_path, name + "\nshrinc = 0.1", plugin=TYPED)) == (
        "strategy.shrinc: unknown key 'shrinc' (did you mean 'shrink'?); allowed: name; "
        "parameters of strategy 'plugin.py:Shrink': mode, server-lr, shrink"
    )


def test_custom_strategy_without_params_is_checked_by_its_signature(tmp_path: Path) -> None:
    name = 'name = "plugin.py:Plain"'
    ok = load_scenario(_scenario(tmp_path, name + '\nserver-lr = 0.5\nlabel = "y"', plugin=PLAIN))
    assert ok.strategy.params == {"server_lr": 0.5, "label": "y"}
    assert _error(_scenario(tmp_path, name + "\nserver-lr = -1.0", plugin=PLAIN)) == "strategy: server-lr must be > 0, got -1.0"
    assert _error(_scenario(tmp_path, name + "\nserverlr = 1.0", plugin=PLAIN)) == (
        "strategy.serverlr: unknown key 'serverlr' (did you mean 'server-lr'?); allowed: name; "
        "parameters of strategy 'plugin.py:Plain': label, server-lr"
    )


def test_a_bad_typed_parameter_is_exit_2_on_the_command_line(tmp_path: Path) -> None:
    path = _scenario(tmp_path, 'name = "dp-ftrl"\nbuffers = "three"')
    proc = run_cli("run", str(path), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr.strip() == f"error: {path}: strategy.buffers: must be an integer, got 'three'"


def test_train_config_from_dict_is_the_strict_inverse_of_to_dict() -> None:
    for config in (TrainConfig(3, 0.05, 2, 8, clip_norm=0.5), TrainConfig(0, 0.1, 1, 16)):
        assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict({"round": 1, "lr": 1, "local_epochs": 1, "batch_size": 4, "other": "x"}).lr == 1.0
    good = TrainConfig(0, 0.1, 1, 16).to_dict()
    for key, value, needle in [
        ("round", "zero", "train config 'round' must be an integer >= 0, got 'zero'"),
        ("lr", float("nan"), "train config 'lr' must be a finite number > 0"),
        ("batch_size", True, "train config 'batch_size' must be an integer >= 1, got True"),
        ("clip_norm", -1.0, "train config 'clip_norm' must be > 0, got -1.0"),
    ]:
        with pytest.raises(ValueError, match=f"^{needle}"):
            TrainConfig.from_dict({**good, key: value})
    with pytest.raises(ValueError, match="lacks 'local_epochs'"):
        TrainConfig.from_dict({k: v for k, v in good.items() if k != "local_epochs"})


def test_opacus_trainer_builds_from_params() -> None:
    import torch

    trainer = OpacusTrainer(torch.nn.Linear(3, 2), OpacusParams(noise_multiplier=0.7, target_delta=1e-5))
    assert (trainer.noise_multiplier, trainer.target_delta, trainer.max_participations) == (0.7, 1e-5, None)
