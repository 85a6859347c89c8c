"""Markdown summary of a scripts/gpu-check.sh run: python3 scripts/gpu_summary.py LOG_DIR."""
import json
import sys
from pathlib import Path

TARGET_RPS, TARGET_P99_MS, TARGET_FLOOR_RATIO = 20_000, 20.0, 3.0


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def floor_at(rows, batch):
    """Floor (ms) of a batch of `batch` rows, linear between the measured sizes."""
    rows = sorted(rows, key=lambda r: r["batch_size"])
    for lo, hi in zip(rows, rows[1:]):
        if lo["batch_size"] <= batch <= hi["batch_size"]:
            t = (batch - lo["batch_size"]) / (hi["batch_size"] - lo["batch_size"])
            return lo["floor_ms"] + t * (hi["floor_ms"] - lo["floor_ms"])
    return rows[-1]["floor_ms"] if batch > rows[-1]["batch_size"] else rows[0]["floor_ms"]


def main(logs):
    out = []
    steps = [line.split("\t") for line in (logs / "steps.tsv").read_text().splitlines() if line]
    env = (logs / "env.log").read_text() if (logs / "env.log").exists() else ""
    gpu = next((l.strip() for l in env.splitlines() if "H200" in l or "NVIDIA" in l and "MiB" in l), "")
    out.append("## GPU check\n")
    if gpu:
        out.append(f"nvidia-smi: `{gpu}`\n")
    out.append("| step | exit | seconds |\n|---|---:|---:|")
    out += [f"| {name} | {rc} | {secs} |" for name, rc, secs in steps]

    parity = load(logs / "parity.json")
    if parity:
        out.append(f"\n### CPU fp32 vs {parity['device']}: top-{parity['k']} agreement\n")
        out.append("| precision | users | identical lists | mean overlap | min overlap | max abs score diff | criterion |")
        out.append("|---|---:|---:|---:|---:|---:|---|")
        for precision, a in parity["agreement"].items():
            if precision == "fp32":
                rule, met = "same items, scores within 1e-4", (
                    a["identical_lists"] == a["users"] and a["max_abs_score_diff"] <= 1e-4
                )
            else:
                rule, met = "mean overlap >= 9/10", a["mean_overlap"] >= 9.0
            out.append(
                f"| {precision} | {a['users']} | {a['identical_lists']} | {a['mean_overlap']:.2f} "
                f"| {a['min_overlap']} | {a['max_abs_score_diff']:.2e} | {rule}: {'met' if met else 'missed'} |"
            )

    forwards = {p.stem: load(p) for p in sorted(logs.glob("forward-*.json"))}
    for name, f in forwards.items():
        if not f:
            continue
        c, m = f["ceilings"], f["model"]
        out.append(
            f"\n### {name}: {m['num_items'] - 1:,} items, d {m['d_model']}, {m['n_layers']} layers, "
            f"max_len {m['max_len']}, {f['precision']} on {f['device']}\n"
        )
        out.append(
            f"Ceilings: bf16 matmul {c['bf16_matmul_flops'] / 1e12:.1f} TFLOP/s, fp32 matmul "
            f"{c['fp32_matmul_flops'] / 1e12:.1f} TFLOP/s, copy {c['copy_bytes_per_sec'] / 1e9:.0f} GB/s.\n"
        )
        out.append(
            "| batch | encode ms | copy in ms | forward ms | rank+out ms | device ms | seq/s | GFLOP | MB | floor ms "
            "| of floor |"
        )
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in f["rows"]:
            out.append(
                f"| {r['batch_size']} | {r['encode_ms']:.3f} | {r['copy_in_ms']:.3f} | {r['forward_ms']:.3f} | {r['rank_out_ms']:.3f} "
                f"| {r['device_ms']:.3f} | {r['sequences_per_sec']:,.0f} | {r['flops'] / 1e9:.2f} "
                f"| {r['bytes'] / 1e6:.1f} | {r['floor_ms']:.4f} | {100 * r['floor_fraction']:.1f}% |"
            )

    trains = {p.stem: load(p) for p in sorted(logs.glob("train-*.json"))}
    if trains:
        out.append("\n### One training epoch, ml-100k (L50)\n")
        out.append("| where | sequences/s |\n|---|---:|")
        out += [f"| {name[6:]} | {e[0]['sequences_per_sec']:,.0f} |" for name, e in trains.items() if e]

    for path in sorted(logs.glob("load-*.json")):
        run = load(path)
        if not run:
            continue
        precision = path.stem[5:]
        large = forwards.get(f"forward-large-{precision}")
        pre = run.get("preload") or {}
        out.append(
            f"\n### End to end, {precision}: server on the device, {pre.get('users', 0):,} users preloaded "
            f"({pre.get('events', 0):,} events in {pre.get('seconds', 0):.1f} s), no hidden-state cache\n"
        )
        out.append(
            "| concurrency | req/s | p50 ms | p99 ms | errors | client mean ms | server mean ms | mean batch "
            "| queue wait ms | forward ms | rank ms | floor ms at mean batch | device time / floor | worker busy | targets |"
        )
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        histograms = []
        for level in run["levels"]:
            s = level["server"]
            gpu_ms = s["mean_forward_ms"] + s["mean_rank_ms"]
            floor = floor_at(large["rows"], s["mean_batch_size"]) if large else float("nan")
            ratio = gpu_ms / floor if floor == floor and floor > 0 else float("nan")
            met = (
                level["requests_per_sec"] >= TARGET_RPS
                and level["p99_ms"] <= TARGET_P99_MS
                and ratio <= TARGET_FLOOR_RATIO
            )
            out.append(
                f"| {level['concurrency']} | {level['requests_per_sec']:,.0f} | {level['p50_ms']:.2f} "
                f"| {level['p99_ms']:.2f} | {level['errors']} | {level['mean_ms']:.2f} | {s['mean_recommend_ms']:.2f} "
                f"| {s['mean_batch_size']:.1f} "
                f"| {s['mean_queue_wait_ms']:.2f} | {s['mean_forward_ms']:.2f} | {s['mean_rank_ms']:.2f} "
                f"| {floor:.3f} | {ratio:.1f}x | {100 * s['worker_busy_fraction']:.0f}% | {'met' if met else 'missed'} |"
            )
            hist = ", ".join(f"≤{le}: {n:.0f}" for le, n in s["batch_size_histogram"] if n)
            histograms.append(f"\nBatch sizes at c={level['concurrency']}: {hist}")
        out += histograms
    out.append(
        "\nClient mean − server mean = HTTP, JSON and the load generator; server mean = queue wait + the "
        "batch's forward and rank (each request waits for its whole batch) + handler work."
    )
    out.append(
        f"\nTargets: ≥ {TARGET_RPS:,} recommend req/s with p99 ≤ {TARGET_P99_MS:.0f} ms, and device time per "
        f"batch (forward + rank) within {TARGET_FLOOR_RATIO:.0f}x of the floor."
    )
    print("\n".join(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
