#!/usr/bin/env python3
"""Summarises runs/cross-session/*/scores.json (from scripts/cross_session.sh) as the markdown of
the cross-session section of docs/QUALITY.md.

Per pattern: session-start and continuing test NDCG@10, mean ± sd over seeds, for every reference
and model; then the issue's bar per pattern: the full model's session-start NDCG@10 as a share of
the oracle's, and its paired bootstrap interval against the flattened-time control (per seed).
"""
import json
import pathlib
import re
import statistics
import sys

ROOT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cross-session")
ORDER = ["popularity", "last item + gap", "user's topics", "plain", "lstm", "full", "readouts", "lean", "no-successor", "no-clock", "calendar", "control", "oracle"]
LABELS = {
    "popularity": "popularity",
    "last item + gap": "last item + gap (transitions)",
    "user's topics": "user's topics (knows item topics, no rule)",
    "plain": "plain SASRec (no session/time features)",
    "lstm": "LSTM",
    "full": "full model (default recipe: the better of the next two on validation)",
    "readouts": "full model with its readouts (session successor, clock)",
    "lean": "full model without readouts",
    "no-successor": "full model without the session-successor readout",
    "no-clock": "full model without the clock readout",
    "calendar": "full model plus the shared calendar embedding (`--calendar`)",
    "control": "full model, flattened-time control",
    "oracle": "oracle (reads the rule)",
}


def mean_sd(values):
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def load():
    runs = {}
    for path in sorted(ROOT.glob("*-seed*/scores.json")):
        pattern, seed = re.match(r"(.+)-seed(\d+)$", path.parent.name).groups()
        runs.setdefault(pattern, {})[int(seed)] = json.loads(path.read_text())
    return runs


def ndcg(report, model, subset):
    metrics = report["metrics"].get(model)
    return None if metrics is None else metrics[subset]["means"].get("NDCG@10", 0.0)


def main():
    runs = load()
    if not runs:
        sys.exit(f"no scores under {ROOT}")
    order = ["rotation", "return", "periodic", "funnel", "mixture"]
    for pattern in sorted(runs, key=lambda p: order.index(p) if p in order else len(order)):
        reports = runs[pattern]
        seeds = sorted(reports)
        starts = [reports[s]["metrics"]["oracle"]["new_session"]["cases"] for s in seeds]
        print(f"### {pattern} (seeds {', '.join(map(str, seeds))}; {statistics.mean(starts):.0f} session-start test users per seed)\n")
        print("| scorer | session-start NDCG@10 | continuing NDCG@10 |")
        print("|---|---:|---:|")
        for model in ORDER:
            new = [v for s in seeds if (v := ndcg(reports[s], model, "new_session")) is not None]
            same = [v for s in seeds if (v := ndcg(reports[s], model, "same_session")) is not None]
            if new:
                partial = f" ({len(new)} of {len(seeds)} seeds)" if len(new) < len(seeds) else ""
                print(f"| {LABELS[model]}{partial} | {mean_sd(new)} | {mean_sd(same)} |")
        print()
        rows = []
        for s in seeds:
            report = reports[s]
            full, oracle, control = (ndcg(report, m, "new_session") for m in ("full", "oracle", "control"))
            vs_control = next(
                (c for c in report["session_start_comparisons"] if c["model"] == "full" and c["reference"] == "control"),
                None,
            )
            if full is None or oracle is None:
                continue
            share = full / oracle if oracle else float("nan")
            interval = (
                f"{vs_control['mean_difference']:+.3f} ({vs_control['lower']:+.3f} .. {vs_control['upper']:+.3f})"
                if vs_control
                else "–"
            )
            ratio = f"{full / control:.1f}×" if control else "–"
            rows.append(f"| {s} | {share:.0%} | {interval} | {ratio} |")
        if rows:
            print("| seed | full / oracle (session starts) | full − control, 95% paired CI | full / control |")
            print("|---:|---:|---:|---:|")
            print("\n".join(rows))
            print()


if __name__ == "__main__":
    main()
