"""Check the convergence-rate bounds of GD/SGD on the PSI manifold numerically.

Runs PSI GD, SGD, momentum and Adam and Euclidean GD on scale-invariant problems (Rayleigh
quotients, BN least squares and logistic regression, a BN MLP on digits) and measures both
sides of each statement of theory/README.md: the O(1/T) GD rate and the per-step descent
inequality for eta <= 1/L, the SGD bound with constant and 1/sqrt(T) step sizes, equivariance
of the iterates from equivalent starts, PSI GD against Euclidean GD from initial scales 0.1,
1 and 10, and negative controls that must fail. Prints one line per check and exits with 1
when a check whose hypotheses hold fails or a negative control does not fire.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from psi_geoopt.commandline import (
    check_output_directory,
    format_table,
    machine_description,
    positive_int,
    write_json_atomically,
)

from .suite import run_suite

__all__ = ["add_arguments", "bottom_line", "failures", "format_checks", "run", "tuned_cases"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer problems and shorter runs: 21 checks in about 20 s of CPU time, instead of "
        "the full suite's 37 in about 5 minutes",
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="write the checks and metadata as JSON here"
    )
    parser.add_argument(
        "--plots", type=Path, metavar="DIR", help="write log-log rate plots (PNG) into DIR"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads (default: %(default)s)",
    )


def failures(records: list[dict]) -> list[str]:
    """Names of the checks that make the run fail: a check whose hypotheses hold and that did
    not pass, or a negative control that did not fire."""
    return [
        r["name"]
        for r in records
        if (r.get("expect_violation") and not r["violated"])
        or (not r.get("expect_violation") and r["hypotheses_hold"] and not r["passed"])
    ]


def _format(value, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(v, digits) for v in value) + "]"
    return str(value)


def _format_sides(observed, bound) -> tuple[str, str]:
    """Both sides with 3 significant digits, or as many more as it takes to tell apart two
    different numbers (a row never shows "0.5 <= 0.5" for a comparison that fails)."""
    for digits in range(3, 18):
        left, right = _format(observed, digits), _format(bound, digits)
        if left != right or observed == bound:
            break
    return left, right


def _outcome(record: dict) -> str:
    if record.get("expect_violation"):
        return "fired" if record["violated"] else "DID NOT FIRE"
    if not record["hypotheses_hold"]:
        return "pass (not required)" if record["passed"] else "fail (not required)"
    return "pass" if record["passed"] else "FAIL"


def _hypotheses(record: dict) -> str:
    if record.get("expect_violation"):
        return "violated on purpose"
    return "hold" if record["hypotheses_hold"] else "NOT MET"


def format_checks(records: list[dict]) -> str:
    """The table: one line per check, ``observed relation bound`` and the result (a control
    fires when that relation fails)."""
    rows = []
    for r in records:
        observed, bound = _format_sides(r["observed"], r["bound"])
        relation = r.get("relation", "<=")
        rows.append((r["name"], _hypotheses(r), observed, relation, bound, _outcome(r)))
    return format_table(("check", "hypotheses", "observed", "", "bound", "result"), rows)


def format_comparisons(records: list[dict]) -> str:
    """Plain-language lines on who is faster, PSI GD or Euclidean GD."""
    lines = []
    for r in records:
        if not r["name"].startswith("euclidean-comparison/"):
            continue
        equal, tuned = r["iterations_equal_eta"], r["iterations_tuned_eta"]
        lines.append(
            f"{r['problem']}: iterations to |grad f|_g <= {r['eps_relative']:g} x initial "
            f"(at most {r['max_steps']}; None = not reached)"
        )
        for init in r["faster"]["equal_eta"]:
            lines.append(
                f"  start {init:>5}: eta=1/L  PSI {equal['psi-gd@' + init]}, Euclidean "
                f"{equal['euclidean-gd@' + init]} -> faster: {r['faster']['equal_eta'][init]};"
                f"  best eta  PSI {tuned['psi-gd']}, Euclidean {tuned['euclidean-gd@' + init]}"
                f" -> faster: {r['faster']['tuned_eta'][init]}"
            )
    lines.extend(bottom_line(records))
    return "\n".join(lines)


def _tally(verdicts: list[str]) -> str:
    counts = {who: verdicts.count(who) for who in ("psi", "euclidean", "tie")}
    unresolved = len(verdicts) - sum(counts.values())
    return (
        f"PSI GD faster in {counts['psi']}, Euclidean GD in {counts['euclidean']}, "
        f"tie in {counts['tie']}" + (f", neither reached eps in {unresolved}" if unresolved else "")
    )


def tuned_cases(records: list[dict]) -> list[dict]:
    r"""The cases of the comparison at each method's best step size, with the counts of the
    per-start rows: per problem, the starts :math:`c W_0` as one case ("starts 0.1/1/10") when
    the tuned Euclidean counts from :math:`0.1 W_0, W_0, 10 W_0` coincide (they should:
    Euclidean GD's grid scales with :math:`c^2`, and from :math:`c W_0` with step
    :math:`c^2\eta` it is :math:`c` times its run from :math:`W_0` with step :math:`\eta`),
    each start on its own otherwise, and the mixed start :math:`S W_0` ("start mixed"). Each
    case: ``problem``, ``start``, ``psi``, ``euclidean`` (iterations, ``None`` = not reached)
    and ``faster`` (the row's verdict)."""
    cases = []
    for r in records:
        if not r["name"].startswith("euclidean-comparison/"):
            continue
        tuned = r["iterations_tuned_eta"]
        scaled = ("0.1", "1", "10")
        if len({tuned[f"euclidean-gd@{c}"] for c in scaled}) == 1:
            starts = [("starts 0.1/1/10", "1")]
        else:
            starts = [(f"start {c}", c) for c in scaled]
        for label, start in [*starts, ("start mixed", "mixed")]:
            cases.append(
                {
                    "problem": r["problem"],
                    "start": label,
                    "psi": tuned["psi-gd"],
                    "euclidean": tuned[f"euclidean-gd@{start}"],
                    "faster": r["faster"]["tuned_eta"][start],
                }
            )
    return cases


def _cases(cases: list[dict]) -> str:
    return "; ".join(
        f"{c['problem']}, {c['start']}: PSI {c['psi']}, Euclidean {c['euclidean']}" for c in cases
    )


def bottom_line(records: list[dict]) -> list[str]:
    """Who is faster, PSI GD or Euclidean GD, over every comparison problem and start, at the
    same step size and at each method's best step size (empty without comparisons), from the
    counts of the per-start rows (:func:`tuned_cases`)."""
    comparisons = [r for r in records if r["name"].startswith("euclidean-comparison/")]
    if not comparisons:
        return []
    equal = [v for r in comparisons for v in r["faster"]["equal_eta"].values()]
    cases = tuned_cases(records)
    wins = [c for c in cases if c["faster"] == "psi"]
    others = [c for c in cases if c["faster"] != "psi"]
    if not others:
        verdict = (
            "The acceleration claim reproduces: PSI GD needed fewer iterations than tuned "
            "Euclidean GD in every case."
        )
    elif not wins:
        verdict = (
            "The acceleration claim does not reproduce against tuned Euclidean GD: PSI GD "
            "needed fewer iterations in none of the cases."
        )
    else:
        verdict = (
            f"Against tuned Euclidean GD the acceleration claim reproduces in {len(wins)} of "
            f"{len(cases)} cases only ({_cases(wins)}), not in the other {len(others)} "
            f"({_cases(others)})."
        )
    problems = len(comparisons)
    return [
        "",
        f"Bottom line ({problems} problem{'s' if problems != 1 else ''}; iterations to eps, "
        "fewer = faster):",
        f"  same eta = 1/L, starts 0.1/1/10/mixed: {_tally(equal)}. Euclidean GD's count "
        "depends on the initial scale (effective step eta/|w|^2), PSI GD's does not.",
        f"  each method's best eta, starts 0.1/1/10 (one case when their counts coincide) and "
        f"mixed: {_tally([c['faster'] for c in cases])}.",
        f"  {verdict}",
    ]


def _jsonable(value):
    """Records as strict JSON: numpy scalars to Python, non-finite floats to ``None``."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _metadata(mode: str, machine: dict, started: datetime, duration: float) -> dict:
    return {
        "mode": mode,
        "started_utc": started.isoformat(timespec="seconds"),
        "duration_s": round(duration, 2),
        "machine": machine,
    }


def run(args: argparse.Namespace) -> int:
    for option in ("json", "plots"):
        if not hasattr(args, option):
            setattr(args, option, None)
    if args.json is not None:
        if args.json.is_dir():
            print(f"error: --json {str(args.json)!r} is a directory", file=sys.stderr)
            return 2
        reason = check_output_directory(args.json.parent)
        if reason is not None:
            print(f"error: --json: {reason}", file=sys.stderr)
            return 2
    if args.plots is not None:
        reason = check_output_directory(args.plots)
        if reason is not None:
            print(f"error: --plots: {reason}", file=sys.stderr)
            return 2
    mode = "quick" if args.quick else "full"
    threads = getattr(args, "threads", 1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    machine = machine_description()
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    try:
        records = run_suite(mode, report=lambda line: print(f"... {line}", file=sys.stderr))
    finally:
        torch.set_num_threads(previous_threads)
    duration = time.perf_counter() - clock
    records = _jsonable(records)
    print(format_checks(records))
    print()
    print(format_comparisons(records))
    failed = failures(records)
    print()
    print(
        f"{len(records)} checks, {len(failed)} failed, in {duration:.1f} s ({mode})"
        + (": " + ", ".join(failed) if failed else "")
    )
    if args.json is not None:
        write_json_atomically(
            args.json, {"checks": records, **_metadata(mode, machine, started, duration)}
        )
        print(f"wrote {args.json}")
    if args.plots is not None:
        from .plots import plot_rates

        for path in plot_rates(records, args.plots):
            print(f"wrote {path}")
    return 1 if failed else 0
