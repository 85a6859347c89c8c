"""The table of scripts/overload.sh: one row per level and limit, from the bench's JSON."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
print("| limit | load | offered/s | answered/s | % of peak | p50 ms | p99 ms | 429/s | 429 p99 ms | not sent | errors |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for target, limit in (("5", "adaptive (5 ms)"), ("0", "static")):
    peak = json.loads((out / f"peak-{target}.json").read_text())["levels"][0]["requests_per_sec"]
    for run in ("peak", "open", "closed"):
        for level in json.loads((out / f"{run}-{target}.json").read_text())["levels"]:
            rate = level["offered_per_sec"]
            load = f"open {rate / peak:.2g}×" if rate else f"closed {level['concurrency']}"
            print(
                f"| {limit} | {load} | {rate or 0:.0f} | {level['requests_per_sec']:.0f} "
                f"| {100 * level['requests_per_sec'] / peak:.0f}% | {level['p50_ms']:.1f} | {level['p99_ms']:.1f} "
                f"| {level['shed'] / level['seconds']:.0f} | {level['shed_p99_ms']:.1f} | {level['not_sent']} | {level['errors']} |"
            )
