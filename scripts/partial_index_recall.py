#!/usr/bin/env python3
"""Whether a first stage that reads part of the item table (faiss's IVF and HNSW, maintained
libraries) can find the exact top-10 of the large artifact (scripts/large.sh) cheaply: recall@10
against exact scoring, seen items excluded, for the model's own hidden states over random
full-length histories, and the search time per query on one thread. docs/BENCHMARKS.md ("A
partial first stage on the large artifact") quotes its output. faiss is a measuring tool here,
not a dependency: it goes to a scratch folder, the project's venv supplies torch.

    .venv/bin/pip install --target /tmp/faisslib faiss-cpu
    PYTHONPATH=/tmp/faisslib .venv/bin/python scripts/partial_index_recall.py [--model runs/large/model]
"""
import argparse
import pathlib
import random
import sys
import time

import faiss
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "models" / "torch"))
from xsrec_torch import XsrecModel, load_artifact  # noqa: E402
from xsrec_torch.features import batch, encode  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="runs/large/model")
parser.add_argument("--users", type=int, default=1000)
parser.add_argument("--seed", type=int, default=7)
parser.add_argument("--k", type=int, default=10)
args = parser.parse_args()

artifact = load_artifact(args.model)
cfg = artifact.model_config
model = XsrecModel(cfg).eval()
model.load_state_dict(artifact.state_dict, strict=True)
num_items, max_len = cfg["num_items"] - 1, cfg["max_len"]
rng = random.Random(args.seed)

# Full-length histories of uniformly drawn items: mostly minutes apart, a tenth of the gaps
# hours or days (new sessions).
rows, seen = [], []
for _ in range(args.users):
    t, timestamps = 1_700_000_000 + rng.randrange(30 * 86400), []
    for _ in range(max_len):
        t += rng.randrange(3600, 3 * 86400) if rng.random() < 0.1 else rng.randrange(5, 600)
        timestamps.append(t)
    items = [rng.randrange(1, num_items + 1) for _ in range(max_len)]
    rows.append(encode(items, timestamps, [0] * max_len, t + 600, max_len, cfg["session_gap_secs"]))
    seen.append(set(items))

with torch.no_grad():
    states = torch.cat([model.hidden(batch(rows[i : i + 50]))[:, -1] for i in range(0, args.users, 50)])
    table = model.item_table()[1:].float().contiguous()  # row r is item index r + 1
    exact = []
    for user in range(args.users):
        best = torch.topk(table @ states[user], args.k + max_len).indices.tolist()
        exact.append([i + 1 for i in best if i + 1 not in seen[user]][: args.k])
table, states = table.detach().numpy(), states.detach().float().numpy()
norms = np.linalg.norm(table, axis=1)
print(f"{num_items:,} items, item norms {norms.min():.3f}–{norms.max():.3f}; {args.users} users")


def recall(found):
    hits = 0
    for user in range(args.users):
        best = [i + 1 for i in found[user] if i >= 0 and i + 1 not in seen[user]][: args.k]
        hits += len(set(best) & set(exact[user]))
    return hits / (args.k * args.users)


def measure(name, index):
    """Searches on one thread; asks for k + max_len so that excluding seen items leaves k."""
    faiss.omp_set_num_threads(1)
    started = time.time()
    _, found = index.search(states, args.k + max_len)
    per_query = (time.time() - started) / args.users * 1e3
    print(f"{name}: recall@{args.k} {recall(found):.3f}, {per_query:.2f} ms per query", flush=True)


for lists in (1024, 4096):
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(table.shape[1]), table.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    faiss.omp_set_num_threads(2)
    started = time.time()
    ivf.train(table[np.random.default_rng(0).choice(len(table), 40 * lists, replace=False)])
    ivf.add(table)
    print(f"IVF, {lists} lists: built in {time.time() - started:.0f} s")
    for share in (64, 16, 8, 4, 2):
        ivf.nprobe = lists // share
        measure(f"  {ivf.nprobe} lists probed (1/{share} of the table)", ivf)

hnsw = faiss.IndexHNSWFlat(table.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
hnsw.hnsw.efConstruction = 80
faiss.omp_set_num_threads(2)
started = time.time()
hnsw.add(table)
print(f"HNSW, M 32, efConstruction 80: built in {time.time() - started:.0f} s")
for ef in (64, 256, 1024, 4096):
    hnsw.hnsw.efSearch = ef
    measure(f"  efSearch {ef}", hnsw)
