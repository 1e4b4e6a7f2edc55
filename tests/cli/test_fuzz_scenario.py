"""Fuzzing the scenario parser: whatever the file holds, loading it gives a validated Scenario or a
ScenarioError, never another exception; through the command line, exit code 2 and one line."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import string
import tempfile
from pathlib import Path
from typing import Any

import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedsim.cli import main
from fedsim.errors import ScenarioError
from fedsim.scenario import Scenario, load_scenario, scenario_from_dict

from ..conftest import run_cli

BASE: dict[str, Any] = {
    "name": "fuzz",
    "rounds": 2,
    "clients-per-round": 3,
    "data": {"num-devices": 10},
    "model": {"name": "logreg"},
}

# open-section keys (strategy / trainer constructor parameters) of the built-in plug-ins
OPEN_KEYS = [
    "strategy.server-lr", "strategy.momentum", "strategy.noise-multiplier", "strategy.clip-norm",
    "strategy.max-participations", "strategy.min-separation", "strategy.restart-every",
    "strategy.estimator", "strategy.sampling", "strategy.sampling-rate", "client.batched",
    "strategy.target-rho", "strategy.mechanism",
]


def _scenario_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(Scenario):
        if f.name == "source":
            continue
        kebab = f.name.replace("_", "-")
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):  # type: ignore[misc]
            keys += [f"{kebab}.{g.name.replace('_', '-')}" for g in dataclasses.fields(f.default_factory) if g.name != "params"]
        else:
            keys.append(kebab)
    return keys + OPEN_KEYS


KEYS = _scenario_keys()
STRATEGY_NAMES = [
    "fedavg", "dp-fedavg", "dp-ftrl", "", ":", "a:", ":b", "..:X", ".x:Y", "os:getcwd", "os:sep",
    "collections:OrderedDict", "nonexistent_mod_xyz:Cls", "missing.py:Cls", "/dev/null.py:X",
    "scripts/fedavgm.py:Nope", "fedsim.strategy:Strategy", "strategies.fedavg:FedAvg", "x\x00y:Z",
]

scalars = st.one_of(
    st.booleans(),
    st.integers(-5, 50),
    st.integers(),
    st.integers(min_value=2**63, max_value=2**1100),  # beyond int64, and beyond float range
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1e3, 1e3),
    st.text(max_size=12),
    st.sampled_from(["digits", "synthetic", "iid", "dirichlet", "mlp", "logreg", "bernoulli", "diurnal",
                     "always", "inprocess", "flower", "vanilla", "efficient", "poisson", "fixed", "sgd"]),
    st.dates(),
    st.datetimes(),
    st.times(),
    # values found by fuzzing that once ran forever, overflowed the noise or ended in a traceback
    st.sampled_from([1e308, 1e23, 10**23, 10**7 + 1, 1e-300, 1e6, 1e9, 1e12]),
)
toml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _value_for(key: str) -> st.SearchStrategy[Any]:
    if key in ("strategy.name", "client.trainer"):
        return st.sampled_from(STRATEGY_NAMES) | st.text(alphabet=string.ascii_letters + "-_.", max_size=10)
    return toml_values


@st.composite
def _mutated(draw: st.DrawFn) -> dict[str, Any]:
    raw: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for key in draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True)):
        head, _, tail = key.partition(".")
        value = draw(_value_for(key))
        if tail:
            section = raw.setdefault(head, {})
            if isinstance(section, dict):
                section[tail] = value
        else:
            raw[head] = value
    if draw(st.booleans()):  # sometimes a whole section or top-level key of the wrong kind
        raw[draw(st.sampled_from([*BASE, "engine", "privacy", "checkpoint", "client", "strategy", "junk"]))] = draw(toml_values)
    return raw


def _load_or_error(raw: dict[str, Any]) -> Scenario | ScenarioError:
    try:
        scenario = scenario_from_dict(raw, source="fuzz.toml")
    except ScenarioError as exc:
        return exc
    _assert_usable(scenario)
    return scenario


def _floats(d: dict[str, Any]) -> list[float]:
    out = []
    for v in d.values():
        if isinstance(v, dict):
            out += _floats(v)
        elif isinstance(v, float):
            out.append(v)
    return out


def _assert_usable(scenario: Scenario) -> None:
    """A scenario that loads can be built: its plug-ins are the right classes, its numbers finite."""
    import math

    from fedsim.builders import build_strategy
    from fedsim.client import TRAINERS, ClientTrainer
    from fedsim.privacy.events import MAX_NOISE_STD
    from fedsim.strategy import Strategy
    from fedsim.validation import MAX_ROUNDS

    strategy = build_strategy(scenario)
    assert isinstance(strategy, Strategy)
    trainer = TRAINERS.get(scenario.client.trainer, base_dir=scenario.base_dir)
    assert isinstance(trainer, type) and issubclass(trainer, ClientTrainer)
    assert all(math.isfinite(v) for v in _floats(scenario.to_dict()))
    assert scenario.rounds <= MAX_ROUNDS
    mechanism = getattr(strategy, "mechanism", None)
    if mechanism is not None:  # a DP strategy: its noise stays finite in float32
        assert mechanism.std <= MAX_NOISE_STD


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_random_values_for_every_key_give_a_scenario_or_a_scenario_error(raw: dict[str, Any]) -> None:
    out = _load_or_error(raw)
    if isinstance(out, Scenario):
        # a scenario that loads is fully valid: its resolved form loads again to the same thing
        again = scenario_from_dict(out.to_dict(), source="fuzz.toml")
        assert again.to_dict() == out.to_dict()
    else:
        assert str(out).startswith("fuzz.toml")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([*{k.split(".")[0] for k in KEYS}, "x"]) | st.text(max_size=8), toml_values, max_size=6))
def test_random_tables_give_a_scenario_or_a_scenario_error(raw: dict[str, Any]) -> None:
    _load_or_error(raw)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["strategy.name", "client.trainer"]), _value_for("strategy.name"))
def test_any_plugin_name_gives_a_usable_scenario_or_a_scenario_error(key: str, name: str) -> None:
    section, _, field = key.partition(".")
    raw = {**BASE, section: {field: name}}
    out = _load_or_error(raw)
    if isinstance(out, ScenarioError):
        assert f": {key}: " in str(out) or f": {section}: " in str(out), str(out)


# ----------------------------------------------------------------------------------------------
# files: random TOML-ish text and random valid TOML documents

FRAGMENTS = [
    "[data]", "[client]", "[strategy]", "[privacy]", "[engine]", "[checkpoint]", "[population]", "[model]",
    "[[data]]", "[data.sub]", "name", "rounds", "seed", "clients-per-round", "num-devices", "lr", "every",
    "max-rho", "delta", "alpha", "=", " = ", "\n", "\n", "\n", '"', "'", "\"\"\"", "[", "]", "{", "}", ",",
    "#", ".", "-", "+", "0", "1", "7", "1e400", "-1", "nan", "inf", "-inf", "true", "false", "0x1F",
    "1979-05-27", "12:00:00", '"dp-ftrl"', '"x.py:C"', '"fedavg"', "\\u0000", "\\", "\t", "é", "\x00",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=40).map("".join))
def test_random_toml_ish_text_gives_only_scenario_errors(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_scenario(path)
        except ScenarioError as exc:
            assert str(exc).startswith(str(path))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_random_documents_written_as_files_load_or_fail_cleanly(raw: dict[str, Any]) -> None:
    try:
        text = tomli_w.dumps(raw)
    except (TypeError, ValueError):  # not representable as TOML (e.g. NaN keys are fine, None is not)
        assume(False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.toml"
        path.write_text(text, encoding="utf-8")
        with contextlib.suppress(ScenarioError):
            load_scenario(path)


# ----------------------------------------------------------------------------------------------
# the command line: exit code 2, one line on stderr, nothing run


def _cli_in_process(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, err.getvalue()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    _mutated().map(lambda raw: tomli_w.dumps(raw) if _dumpable(raw) else "x = ["),
    st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join),
))
def test_cli_rejects_bad_scenarios_with_exit_2_and_one_line(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        out = Path(tmp) / "out"
        try:
            load_scenario(path, [(["output-dir"], str(out))])  # what the command below loads
        except ScenarioError:
            pass
        else:
            assume(False)  # a valid scenario would run: not this test's business
        code, err = _cli_in_process("run", str(path), "--out", str(out), "--quiet")
        assert code == 2
        assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
        assert not out.exists()


def _dumpable(raw: dict[str, Any]) -> bool:
    try:
        tomli_w.dumps(raw)
        return True
    except (TypeError, ValueError):
        return False


BAD_FILES = {
    "deep.toml": "x = " + "[" * 3000 + "]" * 3000,
    "overflow.toml": 'name = "o"\n[client]\nlr = ' + "9" * 400 + "\n",
    "nan.toml": 'name = "n"\n[privacy]\nmax-rho = nan\n',
    "plugin.toml": 'name = "p"\n[strategy]\nname = "os:getcwd"\n',
    "relative.toml": 'name = "r"\n[strategy]\nname = "..:X"\n',
    "section.toml": 'name = "s"\ncheckpoint = 3\n',
    "every.toml": 'name = "e"\n[checkpoint]\nevery = -1\n',
    "rounds.toml": 'name = "r"\nrounds = 100000000000000000000000\n',
    "clip-noise.toml": 'name = "c"\n[strategy]\nname = "dp-fedavg"\nclip-norm = 1e308\nnoise-multiplier = 10.0\n',
    "clip.toml": 'name = "c"\n[strategy]\nname = "dp-fedavg"\nclip-norm = 1e308\n',
    "std.toml": 'name = "s"\n[strategy]\nname = "dp-ftrl"\nclip-norm = 1e5\nnoise-multiplier = 1e5\n',
    "grad-norm.toml": 'name = "g"\n[client]\ntrainer = "opacus"\nmax-grad-norm = 1e308\n',
    "share.toml": 'name = "w"\n[engine]\nmax-weight-share = 1.5\n',
}


def test_cli_pathological_scenarios_exit_2_with_one_line(tmp_path: Path) -> None:
    for name, text in BAD_FILES.items():
        (tmp_path / name).write_text(text)
        code, err = _cli_in_process("run", str(tmp_path / name), "--out", str(tmp_path / "out"))
        assert code == 2, (name, err)
        assert err.startswith(f"error: {tmp_path / name}: ") and err.count("\n") == 1, (name, err)


def test_cli_bad_scenarios_in_a_real_process_have_no_traceback(tmp_path: Path) -> None:
    for name in ("deep.toml", "plugin.toml"):
        (tmp_path / name).write_text(BAD_FILES[name])
        proc = run_cli("run", str(tmp_path / name), "--out", str(tmp_path / "out"))
        assert proc.returncode == 2, (name, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (name, proc.stderr)
        assert "Traceback" not in proc.stderr
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    proc = run_cli("run", str(tmp_path / "bin.toml"))
    assert proc.returncode == 2 and "is not UTF-8 text" in proc.stderr and proc.stderr.count("\n") == 1
