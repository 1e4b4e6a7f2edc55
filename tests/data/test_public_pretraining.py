"""Public pretraining, then private training, on the fixture plays: the public and private
populations are disjoint by construction, a word vocabulary comes from the public text only, and
the private DP-FTRL run from the public model accounts its own rounds only (the rho `fedsim
privacy` plans for it, the same as from a fresh model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsim.builders import build_strategy
from fedsim.data import shakespeare as shk
from fedsim.engine import run_scenario
from fedsim.errors import ScenarioError
from fedsim.privacy.accountant import dp_ftrl_privacy
from fedsim.scenario import load_scenario

from ..conftest import SCENARIOS

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "shakespeare"
TINY = [(["model", "embedding"], 4), (["model", "hidden"], 8), (["model", "layers"], 1)]


def _on_fixture(name: str, *extra: tuple[list[str], object]):
    overrides = [
        (["data", "path"], str(FIXTURE)), (["data", "min-lines"], 2), (["data", "public-plays"], ["othello"]),
        (["data", "max-test"], 40), (["rounds"], 2), (["clients-per-round"], 2), (["engine", "eval-every"], 1), *TINY, *extra,
    ]
    return load_scenario(SCENARIOS / name, overrides)


def test_public_and_private_populations_are_disjoint_by_construction() -> None:
    plays = shk.read_plays(FIXTURE)
    public = shk.load_corpus(plays=plays, public_plays=["othello"], split="public", min_lines=1)
    private = shk.load_corpus(plays=plays, public_plays=["othello"], split="private", min_lines=1)
    everyone = shk.load_corpus(plays=plays, min_lines=1)
    assert {u.play for u in public.users} == {"othello"}
    assert "othello" not in {u.play for u in private.users} and private.users
    names = lambda c: {u.name for u in c.users}  # noqa: E731
    assert names(public).isdisjoint(names(private)) and names(public) | names(private) == names(everyone)
    # every private line comes from a private play: none of othello's speeches is among them
    othello = {text for _, text in plays["othello"]}
    assert not othello & {line for u in private.users for line in (*u.train, *u.test)}
    # the private test split is the private users' held-out text only
    assert len(private.test) + len(public.test) == len(everyone.test)


def test_word_vocabulary_comes_from_the_public_plays() -> None:
    plays = shk.read_plays(FIXTURE)
    public = shk.load_corpus(plays=plays, level="word", vocab_size=30, public_plays=["othello"], split="public")
    private = shk.load_corpus(plays=plays, level="word", vocab_size=30, public_plays=["othello"], split="private")
    assert public.symbols == private.symbols  # one vocabulary: a warm start's embeddings mean the same words
    own = shk.load_corpus(plays={k: v for k, v in plays.items() if k != "othello"}, level="word", vocab_size=30)
    assert own.symbols != private.symbols  # ... and not the one the private text would give


@pytest.mark.parametrize(
    ("params", "key", "needle"),
    [
        ({"public_plays": ["otello"], "split": "public"}, "data.public-plays", "no play 'otello' (did you mean 'othello'?)"),
        ({"split": "public"}, "data.split", "split = 'public' needs public-plays"),
        ({"public_plays": "all"}, "data.public-plays", "every play is public"),
    ],
)
def test_bad_public_plays(params: dict, key: str, needle: str) -> None:
    plays = shk.read_plays(FIXTURE)
    if params.get("public_plays") == "all":
        params = {"public_plays": sorted(plays)}
    with pytest.raises(ScenarioError) as info:
        shk.load_corpus(plays=plays, **params)
    assert info.value.key == key and needle in info.value.message


def test_pretrain_publicly_then_fine_tune_with_dp_ftrl(tmp_path: Path) -> None:
    public = run_scenario(_on_fixture("shakespeare_public.toml"), run_dir=tmp_path / "public")
    assert public.summary["rho"] is None and public.ledger is None  # no privacy spent on public data
    model_file = tmp_path / "public" / "model.pt"
    dp = [(["strategy", "max-participations"], 2), (["strategy", "min-separation"], 0)]
    private = _on_fixture("shakespeare_private_dp.toml", *dp, (["model", "init"], str(model_file)))
    cold = _on_fixture("shakespeare_private_dp.toml", *dp)
    warm_run = run_scenario(private, run_dir=tmp_path / "private")
    cold_run = run_scenario(cold)
    # it starts from the public model, and says so
    assert warm_run.summary["init"]["path"] == str(model_file.resolve())
    assert json.loads((tmp_path / "private" / "summary.json").read_text())["init"] == warm_run.summary["init"]
    assert not torch.equal(warm_run.params, cold_run.params)
    # rho covers the private rounds only: the ledger holds them, and it is fedsim privacy's plan
    ledger = json.loads((tmp_path / "private" / "ledger.json").read_text())
    assert [e["round"] for e in ledger] == [0, 1]
    target = private.strategy.params["target_rho"]
    assert warm_run.summary["rho"] == pytest.approx(target, rel=1e-6) and warm_run.summary["rho"] == cold_run.summary["rho"]
    z = build_strategy(private).calibrated_noise_multiplier(num_rounds=2)
    plan = dp_ftrl_privacy(z, 2, 2, 0, private.privacy.delta)
    assert warm_run.summary["rho"] == plan.rho
