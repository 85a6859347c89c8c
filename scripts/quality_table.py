#!/usr/bin/env python3
"""Summarises runs/quality/*/eval.json (from scripts/quality.sh) as the markdown in docs/QUALITY.md;
MAIN=VARIANT picks the variant every other one is compared with (default transformer-L200);
EVAL=NAME reads runs/*/NAME instead of eval.json (scripts/quality_1m.sh also writes
eval-unmasked.json, the same models ranked without masking the user's history).

Per variant: mean ± std over seeds of the test metrics, the new-session / same-session split, and
training time; then paired bootstrap 95% intervals over users of the difference in test NDCG@10
(each user's value averaged over seeds first) between the main model and every other variant.
"""
import json
import os
import pathlib
import random
import re
import statistics
import sys

ROOT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quality")
MAIN = os.environ.get("MAIN", "transformer-L200")
EVAL = os.environ.get("EVAL", "eval.json")
METRICS = ["HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR", "AUC"]


def load():
    runs = {}
    for path in sorted(ROOT.glob(f"*-seed*/{EVAL}")):
        variant, seed = re.match(r"(.+)-seed(\d+)$", path.parent.name).groups()
        report = json.loads(path.read_text())
        config = json.loads((path.parent / "config.json").read_text())
        report["train_seconds"] = config["info"]["train_seconds"]
        report["best_epoch"] = config["info"]["best_epoch"]
        runs.setdefault(variant, {})[int(seed)] = report
    return runs


def mean_std(values, digits=4):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def per_user(reports):
    users = sorted(reports[next(iter(reports))]["test_ndcg10_per_user"])
    return users, [statistics.mean(r["test_ndcg10_per_user"][u] for r in reports.values()) for u in users]


def bootstrap(a, b, resamples=2000, seed=7):
    diffs = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return sum(diffs) / n, means[int(0.025 * resamples)], means[int(0.975 * resamples)]


def main():
    runs = load()
    if not runs:
        sys.exit(f"no runs under {ROOT}")
    print("| variant | seeds | " + " | ".join(f"test {m}" for m in METRICS) + " | NDCG@10 new session | NDCG@10 same session | best epoch | train s |")
    print("|---|---:|" + "---:|" * (len(METRICS) + 4))
    first = next(iter(runs.values()))
    popularity = [next(iter(first.values()))["popularity_test"]]
    rows = [("popularity", popularity, None)] + [(v, [r["test"] for r in reps.values()], reps) for v, reps in runs.items()]
    for name, tests, reps in rows:
        cells = [mean_std([t["all"]["means"][m] for t in tests]) for m in METRICS]
        cells += [mean_std([t[s]["means"]["NDCG@10"] for t in tests]) for s in ("new_session", "same_session")]
        cells += ["—", "—"] if reps is None else [mean_std([r["best_epoch"] for r in reps.values()], 0), f"{statistics.mean(r['train_seconds'] for r in reps.values()):.0f}"]
        seeds = "deterministic" if reps is None else str(len(tests))
        print(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    if MAIN in runs:
        print()
        print(f"Paired bootstrap over users, test NDCG@10 of {MAIN} minus each other variant (95% interval):")
        print()
        users, main = per_user(runs[MAIN])
        pop_first = next(iter(runs[MAIN].values()))
        print("| versus | difference | 95% interval |")
        print("|---|---:|---|")
        for name, reps in runs.items():
            if name == MAIN:
                continue
            other_users, other = per_user(reps)
            assert other_users == users
            d, lo, hi = bootstrap(main, other)
            print(f"| {name} | {d:+.4f} | {lo:+.4f} .. {hi:+.4f} |")
        ci = pop_first["ndcg10_vs_popularity"]
        print(f"| popularity (seed {min(runs[MAIN])}) | {ci['mean_difference']:+.4f} | {ci['lower']:+.4f} .. {ci['upper']:+.4f} |")


if __name__ == "__main__":
    main()
