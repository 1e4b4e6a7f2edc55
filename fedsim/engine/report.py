"""The run's report: what ``summary.json`` (and a DP run's ``private/summary.json``) say.

:func:`run_summary` builds both from a finished (or stopped) run's round owner; the owner's run
recorder (:class:`~fedsim.engine.recorder.RunRecorder`) adds the summary hooks' parts and writes
them, once. The keys are documented in :mod:`fedsim.engine.rundir` and docs/threat-model.md
(what a DP run publishes and what it keeps private).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedsim.builders import evaluate
from fedsim.privacy.noise import KEY_FILE

if TYPE_CHECKING:
    from fedsim.engine.rounds import RoundOwner
    from fedsim.privacy.accountant import PrivacyReport

__all__ = ["privacy_figures", "run_summary"]


def privacy_figures(report: PrivacyReport | None) -> dict[str, float | None]:
    """``rho``, ``epsilon``, ``epsilon_rdp`` and ``delta`` of an accountant's report (all
    ``None`` for a run without privacy events), as a metrics row and ``summary.json`` hold them."""
    if report is None:
        return dict.fromkeys(("rho", "epsilon", "epsilon_rdp", "delta"))
    return {"rho": report.rho, "epsilon": report.epsilon, "epsilon_rdp": report.epsilon_rdp, "delta": report.delta}


def run_summary(owner: RoundOwner, wall: float) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(summary, private)``: the public summary of ``owner``'s run (``wall`` seconds) and, for a
    DP run, the exact values it keeps private (``None`` otherwise). The model is evaluated once
    more unless the last round's row was evaluated on it; round callbacks add their keys."""
    sc = owner.scenario
    last_eval = next((m for m in reversed(owner.metrics) if m["accuracy"] is not None), None)
    if last_eval is None or last_eval["round"] != owner.next_round:
        final = evaluate(owner.model, owner.params, owner.data)
    else:
        final = {k: v for k, v in last_eval.items() if k in ("accuracy", "loss", "perplexity")}
    acc, loss = final["accuracy"], final["loss"]
    own = owner.accountant.report(owner.ledger) if owner.ledger is not None else None
    report = owner.with_prior(own)
    summary: dict[str, Any] = {
        "name": sc.name,
        "strategy": sc.strategy.name,
        "accuracy": acc,
        "loss": loss,
        **({"perplexity": final["perplexity"]} if "perplexity" in final else {}),
        "rounds": owner.next_round,
        "rounds_planned": sc.rounds,
        "stopped_reason": owner.stopped_reason,
        "wall_time_s": round(wall, 3),
        **privacy_figures(report),
        # the noise the DP strategy added (solved from target-rho where given); null without DP
        "noise_multiplier": owner.noise_multiplier,
        # per-reason counts are exact, data-dependent values: private in a DP run
        "rejected": None if owner.private else dict(sorted(owner.rejected.items())),
        "num_devices": owner.data.num_devices,
        "clients_per_round": sc.clients_per_round,
        "seed": sc.seed,
        # the warm start's file ([model] init), or None: the builder's seeded initialisation
        "init": None if sc.model.init is None else {"path": sc.model.init, "sha256": sc.model.init_sha256},
    }
    if owner.initial_params is not None:
        # the warm start's own test metrics: what the rounds improved on (post-processing of a
        # public model, evaluated on the same test split as every round)
        summary["init"].update(evaluate(owner.model, owner.initial_params, owner.data))
    equivalent = owner.equivalent_summary()
    if equivalent is not None:
        # a deployment with equivalent-cohort clients per round: its guarantee, beside the run's
        summary["equivalent_rho"] = equivalent["rho"]
        summary["equivalent_epsilon"] = equivalent["epsilon"]
        summary["equivalent"] = equivalent
    if owner.prior is not None:
        # the earlier runs' releases on the same people count: rho adds up (zCDP)
        summary["prior"] = {
            "runs": list(owner.prior.names),
            "rounds": owner.prior.rounds,
            "rho": owner.prior.rho,
            "rho_this_run": privacy_figures(own)["rho"],
        }
    described = owner.trainer.describe()
    if described is not None:
        summary["trainer"] = described
    if owner.keyed:
        summary["run_id"] = owner.run_id
    if owner.private:
        summary["noise_key"] = (
            {"kind": "fixed", "file": str(owner.scenario.noise_key_path)}
            if owner.key_origin == "fixed"
            else {"kind": owner.key_origin, "file": str(KEY_FILE) if owner.key_origin == "secret" else None}
        )
    example = owner.trainer.example_privacy(delta=sc.privacy.delta)
    if example is not None:
        summary["example_level"] = example  # data-independent (the worst device size)
    observed = owner.trainer.observed_example_privacy(delta=sc.privacy.delta)
    if observed is not None and not owner.private:
        summary["example_level_observed"] = observed  # exact figures: public only without DP
    for cb in owner.callbacks:
        cb.on_summary(summary, owner.params, owner.next_round)
    private: dict[str, Any] | None = None
    if owner.private:
        private = {"rejected": dict(sorted(owner.rejected.items()))}
        if observed is not None:  # the trained devices' figure reveals their sizes
            private["example_level"] = observed
    return summary, private
