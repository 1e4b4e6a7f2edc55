"""Any model, any data: the dataset contract, the file loader, model plug-ins, next-token metrics.

Real components throughout: real files on disk, real torch training, the real CLI for bad input.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.data import DataSpec, LazyData, natural_partition
from fedsim.data.files import load_file
from fedsim.engine import Simulation, run_scenario
from fedsim.errors import ScenarioError
from fedsim.models import build_model, get_flat
from fedsim.scenario import load_scenario, parse_override, scenario_from_dict
from fedsim.tasks import Task

from ..conftest import ROOT, SCENARIOS, run_cli

# ----------------------------------------------------------------------------------------------
# natural partitions and the file loader


def test_natural_partition_one_device_per_user_every_example_once() -> None:
    ids = np.array(["b", "a", "c", "a", "b", "b"])
    parts, names = natural_partition(ids)
    assert names == ["a", "b", "c"]
    assert [p.tolist() for p in parts] == [[1, 3], [0, 4, 5], [2]]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(ids)))


def _write_csv(path: Path, rng: np.random.Generator, users: int = 7, rows: int = 90) -> tuple[np.ndarray, np.ndarray]:
    user = rng.integers(0, users, size=rows)
    label = rng.integers(0, 3, size=rows)
    feats = rng.normal(size=(rows, 4)).round(4)
    lines = ["user_id,f0,f1,label,f2,f3"]
    for u, y, f in zip(user, label, feats, strict=True):
        lines.append(f"{u},{f[0]},{f[1]},{y},{f[2]},{f[3]}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return user, label


def _scenario_for(path: Path, body: str = "", name: str = "s") -> Path:
    scen = path.parent / f"{name}.toml"
    scen.write_text(f'name = "{name}"\nrounds = 2\nclients-per-round = 3\n{body}', encoding="utf-8")
    return scen


def test_csv_file_is_naturally_partitioned_and_every_example_assigned_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    user, label = _write_csv(tmp_path / "users.csv", rng)
    scen = _scenario_for(tmp_path / "users.csv", '[data]\ndataset = "users.csv"\n[model]\nname = "logreg"\n')
    sc = load_scenario(scen)
    sim = Simulation(sc, progress=False)
    data = sim.data
    assert data.num_devices == len(np.unique(user)) == 7
    assert data.spec == DataSpec("classification", (4,), 3)
    assert list(data.device_names) == sorted(np.unique(user).tolist())
    # every example is on exactly one device or in the test split
    train_rows = sum(data.num_examples(d) for d in range(data.num_devices))
    assert train_rows + len(data.test_y) == len(label)
    # a device holds exactly its user's training examples
    dataset = data.dataset
    for dev, uid in enumerate(data.device_names):
        x, y = data.client_data(dev)
        assert torch.equal(y, torch.as_tensor(dataset.y_train[dataset.user_ids == uid]))
        assert x.shape[1:] == (4,)
    result = sim.run()
    assert len(result.metrics) == 2 and result.metrics[-1]["accuracy"] is not None


def test_jsonl_next_token_and_npz_loaders(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    lines = []
    for i in range(40):
        seq = rng.integers(3, 20, size=6).tolist()
        lines.append(json.dumps({"user_id": f"u{i % 5}", "x": seq, "y": seq[1:] + [1], "split": "test" if i % 8 == 0 else "train"}))
    (tmp_path / "text.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = load_file(tmp_path / "text.jsonl", pad_id=0, eos_id=1, oov_ids=(2,))
    assert ds.spec == DataSpec("next-token", (6,), 20, pad_id=0, oov_ids=(2,), eos_id=1)
    assert len(ds.y_train) == 35 and len(ds.y_test) == 5
    assert sorted(set(ds.user_ids.tolist())) == [f"u{i}" for i in range(5)]

    x = rng.normal(size=(50, 2, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 4, 50), user_id=np.arange(50) % 9)
    ds = load_file(tmp_path / "d.npz", test_fraction=0.2, seed=3)
    assert ds.spec.input_shape == (2, 3) and ds.spec.task == "classification"
    assert len(ds.y_train) + len(ds.y_test) == 50 and len(ds.y_test) == 10


def test_lazy_data_loads_on_demand_and_is_checked(tmp_path: Path) -> None:
    calls: list[int] = []

    def load(device: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append(device)
        return np.full((device % 3 + 1, 2), device, dtype=np.float32), np.full(device % 3 + 1, device % 2)

    spec = DataSpec("classification", (2,), 2)
    data = LazyData(spec, 1000, load, test_x=np.zeros((4, 2), np.float32), test_y=np.zeros(4, np.int64), cache_size=2)
    assert calls == []
    x, y = data.client_data(7)
    assert x.shape == (2, 2) and calls == [7]
    data.client_data(7)
    assert calls == [7]  # cached


# ----------------------------------------------------------------------------------------------
# plug-ins from files, end to end


def test_user_model_and_dataset_from_files_end_to_end(tmp_path: Path) -> None:
    sc = load_scenario(SCENARIOS / "custom_workload.toml", [parse_override("rounds=3"), parse_override("data.users=30")])
    result = run_scenario(sc, run_dir=tmp_path / "run")
    assert result.summary["num_devices"] == 30
    assert result.summary["trainer"]["path"] == "vmap"
    assert result.metrics[-1]["accuracy"] > 0.3
    # config.toml resolves the plug-in files to absolute paths and runs again from anywhere
    again = load_scenario(tmp_path / "run" / "config.toml")
    assert Path(again.model.name.rpartition(":")[0]).is_absolute()
    assert again.model.params == {"width": 32, "depth": 2}


def test_digits_as_images_train_the_cnn() -> None:
    sc = load_scenario(SCENARIOS / "digits_cnn.toml", [parse_override("rounds=2")])
    sim = Simulation(sc, progress=False)
    x, _ = sim.data.client_data(0)
    assert x.shape[1:] == (1, 8, 8) and sim.data.spec.input_shape == (1, 8, 8)
    assert isinstance(sim.model[0], nn.Conv2d)
    assert sim.trainer.describe()["path"] == "conv"  # grouped convolutions across clients
    result = sim.run()
    assert result.metrics[-1]["accuracy"] > 0.15


def test_model_parameters_are_typed_and_existing_keys_keep_working() -> None:
    base = {"name": "t", "clients-per-round": 2, "model": {"name": "cnn", "channels": [4, 8]}, "data": {"input-shape": [1, 8, 8]}}
    sc = scenario_from_dict(base)
    assert sc.model.params == {"channels": (4, 8)}
    with pytest.raises(ScenarioError, match=r"model\.channels\[1\]: must be an integer"):
        scenario_from_dict({**base, "model": {"name": "cnn", "channels": [4, "x"]}})
    with pytest.raises(ScenarioError, match=r"model\.width: unknown key 'width'( \(did you mean '[a-z-]+'\?\))?; allowed: hidden, init, init-sha256, name; parameters of model 'cnn'"):
        scenario_from_dict({**base, "model": {"name": "cnn", "width": 3}})
    # [model] hidden still sizes the MLP, and the init is what it always was (seeded Linear layers)
    mlp = scenario_from_dict({"name": "t", "clients-per-round": 2, "model": {"name": "mlp", "hidden": 7}})
    sim = Simulation(mlp, progress=False)
    assert sim.model[0].out_features == 7
    old_style = build_model("mlp", num_features=64, num_classes=10, hidden=7, seed=5)
    assert torch.equal(get_flat(old_style), get_flat(build_model("mlp", spec=DataSpec("classification", (64,), 10), hidden=7, seed=5)))


def test_initialisation_is_seeded_and_leaves_the_global_rng_alone() -> None:
    spec = DataSpec("next-token", (10,), 30, pad_id=0)
    state = torch.random.get_rng_state()
    a = get_flat(build_model("transformer-lm", spec=spec, params={"dim": 16, "heads": 2}, seed=11))
    torch.manual_seed(999)  # the global RNG has no influence
    b = get_flat(build_model("transformer-lm", spec=spec, params={"dim": 16, "heads": 2}, seed=11))
    c = get_flat(build_model("transformer-lm", spec=spec, params={"dim": 16, "heads": 2}, seed=12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.random.set_rng_state(state)
    lstm = build_model("lstm-lm", spec=DataSpec("next-token", (10,), 86))
    sizes = {n: tuple(p.shape) for n, p in lstm.named_parameters()}
    assert sizes["embedding.weight"] == (86, 8) and sizes["lstm.weight_hh_l1"] == (1024, 256)  # TFF Shakespeare


# ----------------------------------------------------------------------------------------------
# next-token metrics, worked by hand


def test_next_token_accuracy_excludes_pad_oov_and_eos_by_hand() -> None:
    # vocabulary 6: 0 = pad, 1 = eos, 2 = oov, 3..5 words
    spec = DataSpec("next-token", (4,), 6, pad_id=0, oov_ids=(2,), eos_id=1)
    task = Task(spec)
    y = torch.tensor([[3, 4, 1, 0], [2, 5, 5, 0]])
    pred = torch.tensor([[3, 5, 1, 0], [2, 5, 4, 3]])  # argmax of the logits below
    logits = torch.full((2, 4, 6), -5.0)
    logits.scatter_(2, pred.unsqueeze(2), 5.0)

    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits[: x.shape[0]]

    metrics = task.evaluate(Fixed(), torch.zeros(2, 4, dtype=torch.long), y)
    # counted targets: (0,0)=3 right, (0,1)=4 wrong, (1,1)=5 right, (1,2)=5 wrong; eos (0,2),
    # oov (1,0) and pads (0,3), (1,3) are not counted even where predicted right
    assert metrics["accuracy"] == pytest.approx(2 / 4)
    # loss: every non-pad target (6 of them) counts, eos and oov included
    log_p_right = -math.log(math.exp(5) / (math.exp(5) + 5 * math.exp(-5)))
    log_p_wrong = -math.log(math.exp(-5) / (math.exp(5) + 5 * math.exp(-5)))
    expected = (4 * log_p_right + 2 * log_p_wrong) / 6
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    # a minibatch of padding only has loss 0 (not NaN)
    assert float(task.loss(logits[:1], torch.zeros(1, 4, dtype=torch.long))) == 0.0


def test_next_token_run_writes_perplexity(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    seqs = rng.integers(3, 12, size=(120, 8))
    seqs[:, 6:] = 0  # padded tail
    np.savez(tmp_path / "lm.npz", x=seqs, y=np.roll(seqs, -1, axis=1), user_id=np.arange(120) % 6)
    scen = _scenario_for(tmp_path / "lm.npz", '[data]\ndataset = "lm.npz"\npad-id = 0\n[model]\nname = "lstm-lm"\nhidden = 16\n[client]\nlr = 0.5\n')
    result = run_scenario(load_scenario(scen), run_dir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert list(rows[0])[:4] == ["round", "accuracy", "loss", "perplexity"]
    assert rows[-1]["perplexity"] == pytest.approx(math.exp(rows[-1]["loss"]))
    assert result.summary["perplexity"] == pytest.approx(rows[-1]["perplexity"])
    assert result.summary["trainer"]["path"] == "loop"


# ----------------------------------------------------------------------------------------------
# bad input: one line naming file, key and problem; exit 2; nothing run


BAD_MODELS = {
    "fails": ("def build(spec):\n    raise RuntimeError('no GPU here')\n", "model builder .* failed: RuntimeError: no GPU here"),
    "not_module": ("def build(spec):\n    return 3\n", "returned int, not a torch.nn.Module"),
    "wrong_output": (
        "from torch import nn\ndef build(spec):\n    return nn.Linear(spec.num_features, 4)\n",
        r"outputs shape \[2, 4\] .* needs logits \[2, 10\]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_builders(tmp_path: Path, case: str) -> None:
    source, needle = BAD_MODELS[case]
    (tmp_path / "m.py").write_text(source, encoding="utf-8")
    scen = _scenario_for(tmp_path / "m.py", '[model]\nname = "m.py:build"\n')
    proc = run_cli("run", str(scen), "--out", str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {scen}: model.name: "), proc.stderr
    import re

    assert re.search(needle, lines[0]), lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


BAD_DATA = {
    "shapes": (
        "import numpy as np\nfrom fedsim.data import DataSpec, LazyData\n"
        "def load():\n"
        "    spec = DataSpec('classification', (3,), 2)\n"
        "    return LazyData(spec, 4, lambda d: (np.zeros((2, 3 if d < 3 else 5), np.float32), np.zeros(2, np.int64)),\n"
        "                    test_x=np.zeros((2, 3), np.float32), test_y=np.zeros(2, np.int64))\n",
        r"device 3: inputs have shape \(2, 5\), the dataset's examples are \(3,\)",
    ),
    "labels": (
        "import numpy as np\nfrom fedsim.data import Dataset\n"
        "def load():\n"
        "    y = np.array([0, 1, 2, 7] * 5)\n"
        "    return Dataset('d', np.zeros((20, 2), np.float32), y, np.zeros((4, 2), np.float32), np.zeros(4, np.int64), 3)\n",
        r"training split: label 7 out of range \[0, 3\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_datasets(tmp_path: Path, case: str) -> None:
    source, needle = BAD_DATA[case]
    (tmp_path / "d.py").write_text(source, encoding="utf-8")
    scen = _scenario_for(tmp_path / "d.py", '[data]\ndataset = "d.py:load"\nnum-devices = 4\n[model]\nname = "logreg"\n')
    proc = run_cli("run", str(scen), "--out", str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {scen}: data.dataset: "), proc.stderr
    import re

    assert re.search(needle, lines[0]), lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_model_and_dataset_names(tmp_path: Path) -> None:
    for body, key, needle in (
        ('[model]\nname = "resnet"\n', "model.name", "unknown model 'resnet'; known: cnn, logreg, lstm-lm, mlp, transformer-lm"),
        ('[data]\ndataset = "imagenet"\n', "data.dataset", "unknown dataset 'imagenet'; known: digits, shakespeare, synthetic"),
        ('[data]\ndataset = "nope.csv"\n', "data.dataset", "nope.csv: no such file"),
        ('[data]\ndataset = "digits"\nuser-column = "u"\n', "data.user-column", "unknown key 'user-column'"),
    ):
        scen = _scenario_for(tmp_path / "x", body, name="bad")
        proc = run_cli("run", str(scen), "--out", str(tmp_path / "run"), "--quiet")
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip()
        assert "\n" not in line and line.startswith(f"error: {scen}: {key}: ") and needle in line, line


def test_scenario_loader_keeps_the_old_defaults() -> None:
    sc = scenario_from_dict({"name": "q"})
    out = sc.to_dict()
    assert out["data"]["num-devices"] == 100 and out["data"]["partitioner"] == "iid"
    assert out["model"] == {"name": "mlp", "hidden": 64}
    assert ROOT.exists()


def test_flower_datasets_partitioner_adapter() -> None:
    """``from_partitioner`` against an object with the Partitioner interface (flwr-datasets is an
    optional extra, not installed here): partitions become lazily loaded, checked devices."""
    from fedsim.data.flower_datasets import from_partitioner

    class TwoColumnPartitioner:  # the interface of flwr_datasets.partitioner.Partitioner
        num_partitions = 5

        def __init__(self) -> None:
            self.loaded: list[int] = []

        def load_partition(self, partition_id: int) -> dict[str, list]:
            self.loaded.append(partition_id)
            n = partition_id + 1
            return {"pixels": [[float(partition_id)] * 4] * n, "label": [partition_id % 2] * n}

    part = TwoColumnPartitioner()
    spec = DataSpec("classification", (1, 2, 2), 2)
    data = from_partitioner(
        part, spec=spec, test_x=np.zeros((3, 1, 2, 2), np.float32), test_y=np.zeros(3, np.int64),
        input_column="pixels", transform=lambda x, y: (x.reshape(len(x), 1, 2, 2).astype(np.float32), y),
    )
    assert data.num_devices == 5 and part.loaded == []
    x, y = data.client_data(3)
    assert x.shape == (4, 1, 2, 2) and y.tolist() == [1, 1, 1, 1] and part.loaded == [3]


def test_user_workload_resumes_bit_identically(tmp_path: Path) -> None:
    """A language model on a naturally partitioned data file, crashed mid-run and resumed, ends
    with the same parameters and run log as the run uninterrupted."""
    rng = np.random.default_rng(4)
    seqs = rng.integers(3, 12, size=(80, 6))
    np.savez(tmp_path / "lm.npz", x=seqs, y=np.roll(seqs, -1, axis=1), user_id=np.arange(80) % 10)
    scen = _scenario_for(
        tmp_path / "lm.npz",
        '[data]\ndataset = "lm.npz"\npad-id = 0\n[model]\nname = "transformer-lm"\ndim = 8\nheads = 2\nlayers = 1\n'
        "[checkpoint]\nevery = 2\n[engine]\nthreads = 2\n",
        name="lmresume",
    )
    scen.write_text(scen.read_text().replace("rounds = 2", "rounds = 5"), encoding="utf-8")

    class Crash(Exception):
        pass

    ref = run_scenario(load_scenario(scen, [(["output-dir"], str(tmp_path / "ref"))]), run_dir=tmp_path / "ref")
    out = tmp_path / "crashed"
    sim = Simulation(load_scenario(scen, [(["output-dir"], str(out))]), run_dir=out, progress=False)
    original = sim.run_round

    def run_round(r: int):
        row = original(r)
        if r == 3:
            raise Crash
        return row

    sim.run_round = run_round  # type: ignore[method-assign]
    with pytest.raises(Crash):
        sim.run()
    resumed = Simulation(load_scenario(out / "config.toml"), run_dir=out, progress=False)
    assert resumed.resume() == 2
    again = resumed.run()
    assert torch.equal(again.params, ref.params)
    assert (out / "metrics.jsonl").read_bytes() == (tmp_path / "ref" / "metrics.jsonl").read_bytes()
