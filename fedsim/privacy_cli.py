"""``fedsim privacy``: plan the privacy budget of a DP-FTRL or DP-FedAvg run; make a noise key.

::

    fedsim privacy dp-ftrl --noise-multiplier 7 --rounds 2000 --max-participations 6 \\
        --min-separation 313 [--restart-every R] --delta 1e-10 [--json]
    fedsim privacy dp-fedavg --noise-multiplier 1 --rounds 1000 --sampling-rate 0.01 --delta 1e-6
    fedsim privacy dp-fedavg --noise-multiplier 1 --rounds 1000 --max-participations 5 --delta 1e-6
    fedsim privacy dp-ftrl ... --target-rho 0.81     # solve for the noise multiplier
    fedsim privacy dp-ftrl ... --mechanism blt [--buffers 3 | --blt-params FILE.json]
    fedsim privacy dp-ftrl ... --mechanism banded [--bands B]
    fedsim privacy keygen PATH [--force]           # a fixed noise key for [privacy] noise-key-file

The plan is the run's own accounting: the registered mechanism (``--mechanism``, any in
:data:`fedsim.privacy.mechanisms.MECHANISMS` that fits the strategy) is built from the flags as a
run would build it from its scenario, its planned events
(:meth:`~fedsim.privacy.mechanisms.Mechanism.plan_events`) go to the accountant, ``--target-rho``
is solved by :func:`fedsim.privacy.calibration.calibrate` on them, and what is particular to the
mechanism (tree RMSE, factorization parameters, sensitivity) comes from its
:meth:`~fedsim.privacy.mechanisms.Mechanism.describe_plan`. Each option of a registered mechanism
is a flag ``--<key>`` (generated from its ``Options``), so a new mechanism needs no change here.

``--json`` prints one object with at least the keys ``rho``, ``epsilon``,
``epsilon_rdp``, ``delta``, ``noise_multiplier`` and, for dp-ftrl, ``prefix_rmse``
(the root-mean-square over rounds of the noise on the released prefix sums, per
coordinate, in units of the clip norm) and ``noise_mechanism``; the matrix-factorization
mechanisms add their parameters (BLT: ``decays`` and ``scales``; banded: ``bands`` and
``num_coefs``, and the ``coefs`` themselves, one per band, only with ``--coefficients``) and
the tree's RMSE at the same ``rho``. Bad input is one line ``error: ...`` on stderr and exit
code 2. :func:`plan` (``fedsim.plan`` from Python) returns the same object.

``keygen`` writes a fresh 256-bit noise key from :mod:`secrets` to ``PATH`` (mode 0600, its
directory 0700 when created) for ``[privacy] noise-key-file``; it never replaces an existing
file unless ``--force`` is given, and never prints the key.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedsim.errors import closest_match
from fedsim.privacy.events import MIN_NOISE_MULTIPLIER
from fedsim.validation import MAX_ROUNDS

__all__ = ["add_parser", "keygen_command", "main", "plan", "run"]


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input as a single ``error: ...`` line (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


class _UsageError(Exception):
    pass


@dataclass(frozen=True)
class _Plan:
    """What a subcommand plans: a DP strategy's run, with the mechanisms that strategy takes."""

    strategy: str
    default_mechanism: str
    takes: Callable[[type], bool]
    sampling: bool  # the strategy's Poisson sampling (--sampling-rate)


#: The strategies ``fedsim privacy`` plans (their ``Params`` say the same: DP-FTRL takes any
#: mechanism, DP-FedAvg those whose releases are independent per round).
_PLANS = {
    "dp-ftrl": _Plan("dp-ftrl", "tree", lambda cls: True, sampling=False),
    "dp-fedavg": _Plan("dp-fedavg", "gaussian", lambda cls: not cls.correlated, sampling=True),
}


@dataclass(frozen=True)
class _Flag:
    """One option flag and the option fields (of one or more mechanisms) it sets."""

    flag: str
    dest: str
    owners: tuple[str, ...]
    fields: tuple[str, ...]
    file: bool
    file_extra: tuple[str, ...] = ()


def _mechanisms(plan: _Plan) -> list[tuple[str, type]]:
    from fedsim.privacy.mechanisms import MECHANISMS

    return [(n, MECHANISMS.get(n)) for n in MECHANISMS.names() if plan.takes(MECHANISMS.get(n))]


def _scalar(hint: Any) -> Any:
    """``X`` of ``X | None``, else ``hint``."""
    args = typing.get_args(hint)
    if (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_option_flags(p: argparse.ArgumentParser, plan: _Plan) -> list[_Flag]:
    """A flag per option of the mechanisms ``plan`` takes (one per JSON-file group)."""
    from fedsim.privacy.mechanisms import option_fields

    flags: dict[str, dict[str, Any]] = {}
    for name, cls in _mechanisms(plan):
        hints = typing.get_type_hints(cls.Options)
        for fname, field in option_fields(cls).items():
            file = field.metadata.get("file")
            flag = f"--{file}" if file else "--" + fname.replace("_", "-")
            entry = flags.get(flag)
            if entry is None:
                entry = flags[flag] = {"owners": [], "fields": [], "field": field, "hint": hints[fname],
                                       "file": bool(file)}
            if name not in entry["owners"]:
                entry["owners"].append(name)
            if fname not in entry["fields"]:
                entry["fields"].append(fname)
    out = []
    for flag, entry in flags.items():
        field = entry["field"]
        dest = "option_" + flag[2:].replace("-", "_")
        owners = ", ".join(entry["owners"])
        help_text = f"{field.metadata.get('help', '')} (--mechanism {owners})"
        if entry["file"]:
            keys = " and ".join(repr(f) for f in entry["fields"])
            p.add_argument(flag, dest=dest, metavar="FILE",
                           help=f"JSON file with keys {keys} to evaluate instead of optimising "
                           f"(--mechanism {owners})")
        else:
            hint = _scalar(entry["hint"])
            kwargs: dict[str, Any] = {"dest": dest, "help": help_text}
            if typing.get_origin(hint) is typing.Literal:
                kwargs["choices"] = typing.get_args(hint)
            elif hint in (int, float, str):
                kwargs["type"] = hint
                kwargs["metavar"] = {int: "N", float: "X", str: "TEXT"}[hint]
            elif hint is bool:
                kwargs["type"] = _parse_bool
                kwargs["metavar"] = "BOOL"
            else:
                continue  # a structured option without a file form is not a flag
            p.add_argument(flag, **kwargs)
        out.append(_Flag(flag, dest, tuple(entry["owners"]), tuple(entry["fields"]), entry["file"],
                         tuple(field.metadata.get("file_extra", ()))))
    return out


def _mechanism_name(plan: _Plan) -> Callable[[str], str]:
    def parse(text: str) -> str:
        names = [n for n, _ in _mechanisms(plan)]
        if text in names or ":" in text:
            return text
        shown = ", ".join(repr(n) for n in names)
        guess = closest_match(text, names)
        hint = f"; did you mean {guess!r}?" if guess is not None else ""
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {shown}, or an import "
                                         f"path package.module:Class){hint}")

    parse.__name__ = "mechanism"
    return parse


def _add_common(p: argparse.ArgumentParser) -> None:
    noise = p.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise-multiplier", type=float, metavar="Z",
                       help=f"noise standard deviation / clipping norm (a finite number >= {MIN_NOISE_MULTIPLIER:g})")
    noise.add_argument("--target-rho", type=float, metavar="RHO",
                       help="solve for the smallest noise multiplier with rho <= RHO (> 0)")
    p.add_argument("--rounds", type=int, required=True, metavar="T", help=f"number of rounds (1..{MAX_ROUNDS})")
    p.add_argument("--delta", type=float, required=True, metavar="DELTA",
                   help="target delta, in (0, 1)")
    p.add_argument("--equivalent-cohort", type=int, metavar="N",
                   help="plan a simulation with the noise per client of a deployment of N clients per round "
                   "([privacy] equivalent-cohort): the noise multiplier (or --target-rho) is the deployment's; "
                   "rho/epsilon are then the simulation's, equivalent_rho/equivalent_epsilon the deployment's "
                   "(needs --clients-per-round)")
    p.add_argument("--clients-per-round", type=int, metavar="n",
                   help="with --equivalent-cohort: the simulated clients per round (its expected cohort with "
                   "Poisson sampling)")
    p.add_argument("--equivalent-population", type=int, metavar="P",
                   help="with --equivalent-cohort: the deployment's devices (checked against what N and (k, b) "
                   "need; required with --sampling-rate, whose deployment samples at N / P)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    clip = p.add_argument_group("adaptive clipping (Andrew et al. 2021): the clipped-count queries, accounted with the updates")
    clip.add_argument("--target-quantile", type=float, metavar="GAMMA",
                      help="plan a run with adaptive clipping toward this quantile, in (0, 1)")
    clip.add_argument("--count-noise-multiplier", type=float, metavar="ZB",
                      help="the clipped-count query's noise multiplier (noise std ZB / 2 on the count)")
    clip.add_argument("--count-rho-fraction", type=float, metavar="F",
                      help="with --target-rho: the counts' share of it, in (0, 1) (default 0.05); "
                           "both noise multipliers are solved")


def add_parser(subparsers: Any) -> None:
    """Register the ``privacy`` subcommand on an argparse ``subparsers`` object.

    The chosen action is in ``args.func``; calling ``args.func(args)`` prints the
    result and returns the exit code (0, or 2 for bad input). The option flags are those of the
    mechanisms registered when this is called.
    """
    p = subparsers.add_parser(
        "privacy",
        help="plan the privacy budget of a run (rho, epsilon); make a noise key (keygen)",
        description="Privacy budget of a DP-FTRL or DP-FedAvg run, or the noise needed for a "
        "target rho. User-level (device-level) DP, zCDP accounting; see docs/privacy.md. "
        "'fedsim privacy keygen PATH' writes a fixed secret noise key for [privacy] noise-key-file.",
    )
    # whatever parser class the caller uses, keep bad input to one line
    p.error = types.MethodType(_OneLineParser.error, p)  # type: ignore[method-assign]
    mech = p.add_subparsers(dest="mechanism", required=True, metavar="COMMAND",
                            parser_class=_OneLineParser)

    ftrl_plan = _PLANS["dp-ftrl"]
    ftrl = mech.add_parser(
        "dp-ftrl",
        help="DP-FTRL with correlated noise: tree aggregation, BLT or banded matrix factorization",
        description="DP-FTRL with correlated noise: tree aggregation (default), a buffered linear "
        "Toeplitz (BLT) or a banded matrix factorization, or any registered mechanism "
        "(--mechanism); exact worst-case sensitivity under the participation limits.",
    )
    _add_common(ftrl)
    ftrl.add_argument("--max-participations", type=int, required=True, metavar="K",
                      help="contributions per device in the whole run (>= 1)")
    ftrl.add_argument("--min-separation", type=int, required=True, metavar="B",
                      help="rounds strictly between two contributions of a device (>= 0)")
    ftrl.add_argument("--mechanism", dest="noise_mechanism", default=ftrl_plan.default_mechanism,
                      type=_mechanism_name(ftrl_plan), metavar="NAME",
                      help="the noise: tree aggregation (tree, default), a buffered linear "
                      "Toeplitz (blt) or banded (banded) matrix factorization, or any registered "
                      "mechanism (" + ", ".join(n for n, _ in _mechanisms(ftrl_plan)) + ")")
    ftrl.add_argument("--coefficients", action="store_true",
                      help="--json: include the long lists of the plan (--mechanism banded: the "
                      "factorization's coefficients, coefs, one per band; left out by default)")
    ftrl.set_defaults(func=run, plan=ftrl_plan, option_flags=_add_option_flags(ftrl, ftrl_plan))

    fedavg_plan = _PLANS["dp-fedavg"]
    fedavg = mech.add_parser(
        "dp-fedavg",
        help="DP-FedAvg (Gaussian mechanism, optionally with Poisson sampling)",
        description="DP-FedAvg: a Gaussian sum per round; with --sampling-rate, Poisson "
        "sampling of devices (epsilon amplified by sampling, rho not).",
    )
    _add_common(fedavg)
    fedavg.add_argument("--sampling-rate", type=float, metavar="Q",
                        help="Poisson sampling rate of devices, in (0, 1] (default: no sampling)")
    fedavg.add_argument("--max-participations", type=int, metavar="K",
                        help="contributions per device (>= 1; default: --rounds without "
                        "sampling, unlimited with it)")
    fedavg.add_argument("--min-separation", type=int, default=0, metavar="B",
                        help="rounds strictly between two contributions of a device (>= 0; default 0)")
    fedavg.add_argument("--mechanism", dest="noise_mechanism", default=fedavg_plan.default_mechanism,
                        type=_mechanism_name(fedavg_plan), metavar="NAME",
                        help="the noise: gaussian (default) or another registered mechanism with "
                        "independent noise each round (" + ", ".join(n for n, _ in _mechanisms(fedavg_plan)) + ")")
    fedavg.set_defaults(func=run, plan=fedavg_plan, option_flags=_add_option_flags(fedavg, fedavg_plan))

    keygen = mech.add_parser(
        "keygen",
        help="write a fresh secret noise key file (for [privacy] noise-key-file)",
        description="Write a fresh 256-bit noise key from the operating system's secure source "
        "(Python's secrets) to PATH, file mode 0600, for a scenario's [privacy] noise-key-file "
        "(reproducible runs under one key; each run still draws independent noise). The key is "
        "never printed. An existing PATH is never replaced without --force.",
    )
    keygen.add_argument("path", metavar="PATH", help="the key file to write")
    keygen.add_argument("--force", action="store_true", help="replace an existing file at PATH")
    keygen.set_defaults(func=keygen_command)


def _validate(args: argparse.Namespace) -> None:
    def bad(flag: str, allowed: str, value: Any) -> None:
        raise _UsageError(f"{flag} must be {allowed} (got {value!r})")

    def finite(v: float) -> bool:
        return v is not None and math.isfinite(v)

    if args.noise_multiplier is not None and not (finite(args.noise_multiplier)
                                                  and args.noise_multiplier >= MIN_NOISE_MULTIPLIER):
        bad("--noise-multiplier", f"a finite number >= {MIN_NOISE_MULTIPLIER:g}", args.noise_multiplier)
    if args.target_rho is not None and not (finite(args.target_rho) and args.target_rho > 0):
        bad("--target-rho", "a finite number > 0", args.target_rho)
    if not 1 <= args.rounds <= MAX_ROUNDS:
        bad("--rounds", f"an integer in 1..{MAX_ROUNDS}", args.rounds)
    if not (finite(args.delta) and 0 < args.delta < 1):
        bad("--delta", "in the open interval (0, 1)", args.delta)
    if args.max_participations is not None and args.max_participations < 1:
        bad("--max-participations", "an integer >= 1", args.max_participations)
    if args.min_separation < 0:
        bad("--min-separation", "an integer >= 0", args.min_separation)
    q = getattr(args, "sampling_rate", None)
    if q is not None and not (finite(q) and 0 < q <= 1):
        bad("--sampling-rate", "in (0, 1]", q)
    if args.equivalent_cohort is None:
        for flag, value in (("--clients-per-round", args.clients_per_round),
                            ("--equivalent-population", args.equivalent_population)):
            if value is not None:
                raise _UsageError(f"{flag} needs --equivalent-cohort (the deployment's clients per round)")
        return
    if args.equivalent_cohort < 1:
        bad("--equivalent-cohort", "an integer >= 1", args.equivalent_cohort)
    if args.clients_per_round is None:
        raise _UsageError("--equivalent-cohort needs --clients-per-round (the simulated cohort whose noise it scales)")
    if args.clients_per_round < 1:
        bad("--clients-per-round", "an integer >= 1", args.clients_per_round)
    if args.equivalent_population is not None and args.equivalent_population < 1:
        bad("--equivalent-population", "an integer >= 1", args.equivalent_population)


def _flag_names(args: argparse.Namespace) -> list[str]:
    """The keys whose flags this subcommand has, longest first (for :func:`_flagged`)."""
    keys = ["rounds", "delta", "noise-multiplier", "target-rho", "max-participations",
            "min-separation", "sampling-rate", "target-quantile", "count-noise-multiplier",
            "count-rho-fraction"]
    keys += [f.flag[2:] for f in args.option_flags if not f.file]
    return sorted(set(keys), key=len, reverse=True)


def _flagged(message: str, keys: list[str]) -> str:
    """The library names parameters by their scenario keys; here they are flags: a key followed
    by its value or by ``must`` becomes ``--key``."""
    pattern = r"(?<![\w-])(" + "|".join(re.escape(k) for k in keys) + r")(?= (?:-?\d|must\b))"
    return re.sub(pattern, r"--\1", message)


def _read_file(flag: _Flag, path: str) -> dict[str, Any]:
    where = f"{flag.flag} {path}"
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise _UsageError(f"{where}: cannot read the file ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise _UsageError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    keys = " and ".join(repr(f) for f in flag.fields)
    if not isinstance(data, dict) or not set(flag.fields) <= set(data):
        raise _UsageError(f"{where}: needs an object with keys {keys}")
    unknown = sorted(set(data) - set(flag.fields) - set(flag.file_extra))
    if unknown:
        raise _UsageError(f"{where}: unknown key {unknown[0]!r} (expected {keys})")
    for key in flag.fields:
        if not isinstance(data[key], list) or not data[key]:
            raise _UsageError(f"{where}: {key} must be a non-empty list of numbers")
    return {key: tuple(data[key]) for key in flag.fields}


def _mechanism(args: argparse.Namespace, plan: _Plan, k: int | None) -> Any:
    """The mechanism the flags describe, built as a run builds it (noise multiplier 1 until known)."""
    from fedsim.privacy.mechanisms import mechanism_class, option_fields

    name = args.noise_mechanism
    try:
        cls = mechanism_class(name)
    except ValueError as exc:
        raise _UsageError(f"--mechanism {name}: {exc}") from None
    if not plan.takes(cls):
        taken = ", ".join(n for n, _ in _mechanisms(plan))
        raise _UsageError(f"--mechanism {name} does not fit {plan.strategy}: its noise is correlated "
                          f"across rounds (mechanisms it takes: {taken})")
    own = option_fields(cls)
    options: dict[str, Any] = {}
    for flag in args.option_flags:
        value = getattr(args, flag.dest)
        if value is None:
            continue
        if not set(flag.fields) <= set(own):
            owners = " or ".join(flag.owners)
            if plan.default_mechanism in flag.owners:
                raise _UsageError(f"{flag.flag} applies to --mechanism {owners} only, not {name}")
            raise _UsageError(f"{flag.flag} needs --mechanism {owners}")
        if flag.file:
            values = _read_file(flag, value)
            try:
                cls.Options(**values)
            except ValueError as exc:
                raise _UsageError(f"{flag.flag} {value}: {exc}") from None
            options.update(values)
        else:
            options[flag.fields[0]] = value
    keys = _flag_names(args)
    q = getattr(args, "sampling_rate", None)
    extra: dict[str, Any] = {}
    if q is not None:
        if not cls.accounts_for_sampling:
            raise _UsageError(f"--sampling-rate needs a mechanism that accounts for sampling "
                              f"(gaussian), not {name}")
        extra["sampling_rate"] = q
    try:
        checked = cls.Options(**options)
        cls.check_plan(args.rounds, options=checked, max_participations=k,
                       min_separation=args.min_separation)
        return cls(noise_multiplier=1.0, clip_norm=1.0, max_participations=k,
                   min_separation=args.min_separation, **options, **extra)
    except ValueError as exc:
        raise _UsageError(_flagged(str(exc), keys)) from None


def _compute(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    from fedsim.privacy.accountant import Accountant
    from fedsim.privacy.calibration import calibrate
    from fedsim.privacy.events import PrivacyLedger
    from fedsim.privacy.sensitivity import max_gaussian_participations

    plan: _Plan = args.plan
    notes: list[str] = []
    sampling = args.sampling_rate if plan.sampling else None
    k = args.max_participations
    if plan.sampling and k is None and sampling is None:
        k = args.rounds
    b = args.min_separation
    eff = max_gaussian_participations(args.rounds, k, b)
    mech = _mechanism(args, plan, k)
    if k is not None and eff < k:
        notes.append(
            f"--max-participations {k} is infeasible with --rounds {args.rounds} and "
            f"--min-separation {b} (at most ceil({args.rounds}/{b + 1}) = {eff} contributions "
            f"fit); using effective max participations {eff}"
        )
    adaptive = _adaptive_plan(args, k, b)
    with warnings.catch_warnings():
        # the infeasible-k warning is reported above, with the flag names
        warnings.simplefilter("ignore", UserWarning)
        if args.target_rho is not None:
            target = args.target_rho if adaptive is None else adaptive["update_target"]
            mech.noise_multiplier = calibrate(mech, target, num_rounds=args.rounds)
        else:
            mech.noise_multiplier = args.noise_multiplier
        events = mech.plan_events(args.rounds)
        if adaptive is None:
            ledger = PrivacyLedger.planned(events)
        else:
            ledger = _with_counts(events, adaptive["count_noise_multiplier"], k, b)
        report = Accountant(args.delta).report(ledger)
        assert report.rho is not None
        details = mech.describe_plan(args.rounds, report.rho)
    result: dict[str, Any] = {
        "rho": report.rho,
        "epsilon": report.epsilon,
        "epsilon_rdp": report.epsilon_rdp,
        "delta": report.delta,
        "noise_multiplier": report.noise_multiplier,
        "mechanism": plan.strategy,
        "rounds": args.rounds,
        "max_participations": k,
        "effective_max_participations": eff,
        "min_separation": b,
    }
    if plan.sampling:
        result["sampling_rate"] = sampling
    if not plan.sampling or args.noise_mechanism != plan.default_mechanism:
        result["noise_mechanism"] = args.noise_mechanism
    result.update(details.fields)
    if args.target_rho is not None:
        result["target_rho"] = args.target_rho
    amplified = any(type(event).amplified for event in set(events))
    if adaptive is not None:
        result["noise_multiplier"] = mech.noise_multiplier  # the updates'; the counts' is its own
        result["target_quantile"] = args.target_quantile
        result["count_noise_multiplier"] = adaptive["count_noise_multiplier"]
        result["count_rho"] = adaptive["count_rho"]
        result["update_rho"] = report.rho - adaptive["count_rho"]
        if adaptive["fraction"] is not None:
            result["count_rho_fraction"] = adaptive["fraction"]
    if args.equivalent_cohort is not None:
        result.update(_equivalent_plan(args, mech, k, sampling, adaptive))
    return {"result": result, "details": details, "amplified": amplified}, notes


def _adaptive_plan(args: argparse.Namespace, k: int | None, b: int) -> dict[str, Any] | None:
    """Adaptive clipping's part of the plan: the count's noise multiplier (given, or solved from its
    share of ``--target-rho``), the rho its queries spend, and what is left for the updates."""
    from fedsim.privacy.adaptive_clipping import check_adaptive
    from fedsim.privacy.calibration import calibrate_count_noise, count_rho

    gamma, zb, fraction = args.target_quantile, args.count_noise_multiplier, args.count_rho_fraction
    keys = _flag_names(args)
    try:
        check_adaptive(gamma, None, zb, fraction, args.target_rho)
    except ValueError as exc:
        raise _UsageError(_flagged(str(exc), keys)) from None
    if gamma is None:
        return None
    if zb is None:
        fraction = 0.05 if fraction is None else fraction
        zb = calibrate_count_noise(fraction * args.target_rho, num_rounds=args.rounds,
                                   max_participations=k, min_separation=b)
    spent = count_rho(zb, num_rounds=args.rounds, max_participations=k, min_separation=b)
    left = None
    if args.target_rho is not None:
        left = args.target_rho - spent
        if not left > 0.0 or left < 1e-12 * args.target_rho:
            raise _UsageError(
                f"--count-noise-multiplier {zb:g}: the clipped-count queries spend rho = {spent:.4g} over "
                f"{args.rounds} rounds, all of --target-rho {args.target_rho:g}, leaving nothing for the "
                "updates; raise --count-noise-multiplier or give --count-rho-fraction instead"
            )
    return {"count_noise_multiplier": float(zb), "count_rho": spent, "update_target": left, "fraction": fraction}


def _with_counts(events: list[Any], zb: float, k: int | None, b: int) -> Any:
    """The planned ledger of a run with adaptive clipping: each round's update event, then its
    clipped-count event (joint with the update's under Poisson sampling), as the run records them."""
    from fedsim.privacy.events import ClippedCountEvent, PrivacyLedger, SampledGaussianEvent

    ledger = PrivacyLedger()
    for t, event in enumerate(events):
        ledger.record(t, event)
        sampled = isinstance(event, SampledGaussianEvent)
        ledger.record(t, ClippedCountEvent(zb, k, b, event.sampling_rate if sampled else None,
                                           event.noise_multiplier if sampled else None))
    return ledger


def _equivalent_plan(args: argparse.Namespace, mech: Any, k: int | None, sampling: float | None,
                     adaptive: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--equivalent-cohort``: the simulation's own guarantee (``rho``, ``epsilon``,
    ``noise_multiplier``: what its run will report) and the deployment's beside it
    (``equivalent``), as :mod:`fedsim.privacy.equivalent` defines them. ``mech`` holds the
    deployment's noise multiplier (given or solved) and the simulation's sampling rate; with
    adaptive clipping (``adaptive``, :func:`_adaptive_plan`) the count's noise multiplier ``z_b``
    is the deployment's too, the simulation's is ``z_b n / N``, and both ledgers hold the counts."""
    import copy

    from fedsim.privacy.accountant import Accountant
    from fedsim.privacy.calibration import count_rho
    from fedsim.privacy.equivalent import (
        STATEMENT,
        Deployment,
        check_deployment,
        simulated_noise_multiplier,
    )
    from fedsim.privacy.events import PrivacyLedger, check_noise_multiplier

    n, big = args.clients_per_round, args.equivalent_cohort
    try:
        deployment = Deployment(big, args.equivalent_population)
        need = check_deployment(deployment, clients_per_round=n, rounds=args.rounds, max_participations=k,
                                min_separation=args.min_separation, poisson=sampling is not None)
    except ValueError as exc:
        raise _UsageError("--" + str(exc)) from None
    accountant = Accountant(args.delta)
    deployed = copy.copy(mech)
    if sampling is not None:
        deployed.sampling_rate = deployment.sampling_rate
    b = args.min_separation
    zb = None if adaptive is None else adaptive["count_noise_multiplier"]

    def ledger(m: Any, count_z: float | None) -> Any:
        events = m.plan_events(args.rounds)
        return PrivacyLedger.planned(events) if count_z is None else _with_counts(events, count_z, k, b)

    dep = accountant.report(ledger(deployed, zb))
    simulated = copy.copy(mech)
    try:
        simulated.noise_multiplier = check_noise_multiplier(
            simulated_noise_multiplier(mech.noise_multiplier, n, big), "the simulated noise multiplier")
        zb_run = None if zb is None else check_noise_multiplier(
            simulated_noise_multiplier(zb, n, big), "the simulated count noise multiplier")
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    run = accountant.report(ledger(simulated, zb_run))
    counts: dict[str, Any] = {}
    dep_counts: dict[str, Any] = {}
    if zb is not None and zb_run is not None:
        assert run.rho is not None
        run_count_rho = count_rho(zb_run, num_rounds=args.rounds, max_participations=k, min_separation=b)
        counts = {"count_noise_multiplier": zb_run, "count_rho": run_count_rho,
                  "update_rho": run.rho - run_count_rho}
        dep_counts = {"count_noise_multiplier": zb, "count_rho": adaptive["count_rho"] if adaptive else None}
    return {
        **counts,
        "rho": run.rho,
        "epsilon": run.epsilon,
        "epsilon_rdp": run.epsilon_rdp,
        "noise_multiplier": simulated.noise_multiplier,
        "clients_per_round": n,
        "equivalent_rho": dep.rho,
        "equivalent_epsilon": dep.epsilon,
        "equivalent": {
            "cohort": big,
            "population": args.equivalent_population,
            "min_population": need,
            "noise_multiplier": mech.noise_multiplier,
            "sampling_rate": deployed.sampling_rate if sampling is not None else None,
            **dep_counts,
            "rho": dep.rho,
            "epsilon": dep.epsilon,
            "epsilon_rdp": dep.epsilon_rdp,
            "delta": dep.delta,
            "statement": STATEMENT,
        },
    }


def _table(computed: dict[str, Any]) -> str:
    result, details = computed["result"], computed["details"]
    k = result["max_participations"]
    eff = result["effective_max_participations"]
    rows = [
        ("mechanism", f"{result['mechanism']} ({details.title})"),
        ("noise multiplier", f"{result['noise_multiplier']:.6g}"),
    ]
    if "target_rho" in result:
        rows.append(("target rho", f"{result['target_rho']:.6g}"))
    rows.append(("rounds", str(result["rounds"])))
    if result.get("sampling_rate") is not None:
        rows.append(("sampling rate", f"{result['sampling_rate']:.6g}"))
    rows.append(("max participations",
                 "unlimited" if k is None else f"{k}" + ("" if eff >= k else f" (effective {eff})")))
    rows.append(("min separation", f"{result['min_separation']} rounds strictly between"))
    rows += list(details.rows)
    if "target_quantile" in result:
        share = f" ({result['count_rho_fraction']:g} of the target)" if "count_rho_fraction" in result else ""
        rows += [
            ("adaptive clipping", f"target quantile {result['target_quantile']:g} (Andrew et al. 2021)"),
            ("count noise mult.", f"{result['count_noise_multiplier']:.6g}  (clipped-count query)"),
            ("rho of the counts", f"{result['count_rho']:.6g}{share}"),
            ("rho of the updates", f"{result['update_rho']:.6g}"),
        ]
    rows += [
        ("rho (zCDP)", f"{result['rho']:.6g}"),
        ("delta", f"{result['delta']:g}"),
        ("epsilon", f"{result['epsilon']:.4f}"
         + ("  (RDP, amplified by sampling)" if computed["amplified"] else "  (exact Gaussian conversion)")),
        ("epsilon_rdp", f"{result['epsilon_rdp']:.4f}  (RDP conversion)"),
    ]
    rows += list(details.tail_rows)
    eq = result.get("equivalent")
    if eq is not None:
        pop = f"{eq['population']:,} devices" if eq["population"] else "not stated"
        rows[1] = ("noise multiplier", f"{result['noise_multiplier']:.6g}  (the simulation's: "
                   f"{eq['noise_multiplier']:.6g} x {result['clients_per_round']} / {eq['cohort']:,})")
        rows.insert(2, ("simulated cohort", f"{result['clients_per_round']} clients per round"))
        if "count_noise_multiplier" in eq:
            rows = [(name, f"{result['count_noise_multiplier']:.6g}  (the simulation's: {eq['count_noise_multiplier']:.6g}"
                     f" x {result['clients_per_round']} / {eq['cohort']:,})") if name == "count noise mult." else (name, v)
                    for name, v in rows]
        for i, (name, value) in enumerate(rows):
            if name in ("rho (zCDP)", "epsilon", "epsilon_rdp"):
                rows[i] = (name, value + "  [this simulation as it runs]")
        rows += [
            ("deployment", f"{eq['cohort']:,} clients per round at noise multiplier {eq['noise_multiplier']:.6g}"
             + (f", count noise multiplier {eq['count_noise_multiplier']:.6g}" if "count_noise_multiplier" in eq else "")),
            ("  needs", f">= {eq['min_population']:,} devices under (k, b); population {pop}"),
            ("  equivalent rho", f"{eq['rho']:.6g}"),
            ("  equivalent eps", f"{eq['epsilon']:.4f}  (delta {eq['delta']:g})"),
            ("  note", "a statement about that configuration, not about the simulation"),
        ]
        rows = [("target rho", v + "  (the deployment's)") if name == "target rho" else (name, v) for name, v in rows]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    """Execute ``fedsim privacy <strategy>``; returns the exit code."""
    try:
        _validate(args)
        computed, notes = _compute(args)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # anything the library rejects that the checks above missed
        print(f"error: {_flagged(str(exc), _flag_names(args))}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(_json_object(args, computed)))
    else:
        print(_table(computed))
    return 0


def _json_object(args: argparse.Namespace, computed: dict[str, Any]) -> dict[str, Any]:
    """What ``--json`` prints: the mechanism's long fields only with ``--coefficients``."""
    out = dict(computed["result"])
    if getattr(args, "coefficients", False):
        out.update(computed["details"].long_fields)
    return out


def plan(mechanism: str, argv: Sequence[str]) -> dict[str, Any]:
    """The object ``fedsim privacy MECHANISM ARGV --json`` prints (``fedsim.plan`` calls this).

    ``argv`` are the command's flags; they are parsed by the command's own parser, so defaults,
    checks and results are the command's.

    Raises
    ------
    ValueError
        Bad input, with the message the command prints after ``error:``. The command's
        ``warning:`` notes are issued as ``UserWarning``.
    """
    parser = argparse.ArgumentParser(prog="fedsim")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(["privacy", mechanism, *argv, "--json"])
    except SystemExit:
        message = captured.getvalue().strip().splitlines()
        raise ValueError((message[-1] if message else "invalid arguments").removeprefix("error: ")) from None
    try:
        _validate(args)
        computed, notes = _compute(args)
    except _UsageError as exc:
        raise ValueError(str(exc)) from None
    except ValueError as exc:
        raise ValueError(_flagged(str(exc), _flag_names(args))) from None
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return _json_object(args, computed)


def keygen_command(args: argparse.Namespace) -> int:
    """Execute ``fedsim privacy keygen PATH [--force]``; returns the exit code (0, or 2)."""
    from pathlib import Path

    from fedsim.privacy.noise import NoiseKey

    path = Path(args.path)
    if not args.path.strip():
        print("error: keygen: PATH must be a file path, got ''", file=sys.stderr)
        return 2
    if path.is_dir():
        print(f"error: keygen: {path} is a directory; give the path of the key file to write", file=sys.stderr)
        return 2
    exists = path.exists() or path.is_symlink()
    if exists and not args.force:
        print(f"error: keygen: {path} exists; refusing to replace it (a key in use there would be lost; "
              "--force replaces it)", file=sys.stderr)
        return 2
    try:
        NoiseKey.generate().save(path, overwrite=bool(args.force))
    except FileExistsError:
        print(f"error: keygen: {path} was created meanwhile; refusing to replace it (--force replaces it)",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: keygen: cannot write {path}: {exc.strerror or type(exc).__name__}", file=sys.stderr)
        return 2
    print(f"wrote a new 256-bit noise key to {path} (mode 0600); use it with [privacy] "
          f"noise-key-file = \"{path.resolve()}\" and keep it secret")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m fedsim.privacy_cli privacy ...``)."""
    parser = _OneLineParser(prog="fedsim")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

