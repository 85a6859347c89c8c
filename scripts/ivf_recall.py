#!/usr/bin/env python3
"""How far a partition index (k-means IVF) gets on a random item table like the untrained large
artifact's (N(0, 0.02) entries): recall@10 of exact inner-product search against the share of the
table scanned, for a few list counts. docs/BENCHMARKS.md, "Large catalogues", quotes its output.

    .venv/bin/python scripts/ivf_recall.py [--items 1000000] [--dim 128] [--lists 1024,4096]
"""
import argparse
import time

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--items", type=int, default=1_000_000)
parser.add_argument("--dim", type=int, default=128)
parser.add_argument("--lists", default="1024,4096")
parser.add_argument("--queries", type=int, default=200)
parser.add_argument("--iterations", type=int, default=8)
args = parser.parse_args()

torch.manual_seed(0)
table = torch.randn(args.items, args.dim) * 0.02
# The table is isotropic, so any query direction is as hard as any other.
queries = torch.randn(args.queries, args.dim)
exact = (queries @ table.t()).topk(10, dim=1).indices
for lists in map(int, args.lists.split(",")):
    started = time.time()
    centroids = table[torch.randperm(args.items)[:lists]].clone()
    for _ in range(args.iterations):
        assign = torch.empty(args.items, dtype=torch.long)
        for s in range(0, args.items, 65536):
            x = table[s : s + 65536]
            assign[s : s + 65536] = (x @ centroids.t() - 0.5 * (centroids * centroids).sum(1)).argmax(1)
        sums = torch.zeros(lists, args.dim).index_add_(0, assign, table)
        counts = torch.bincount(assign, minlength=lists).clamp(min=1).unsqueeze(1)
        centroids = sums / counts
    print(f"{lists} lists: k-means {time.time() - started:.0f} s")
    order = (queries @ centroids.t()).argsort(1, descending=True)
    sizes = torch.bincount(assign, minlength=lists)
    rank_of_list = torch.empty_like(order)
    rank_of_list.scatter_(1, order, torch.arange(lists).expand(len(queries), lists).contiguous())
    list_rank_of_best = rank_of_list.gather(1, assign[exact])
    for probes in (8, 32, 64, 128, 256, 512):
        if probes > lists:
            continue
        recall = (list_rank_of_best < probes).float().mean().item()
        scanned = sizes[order[:, :probes]].sum(1).float().mean().item() / args.items
        print(f"  {probes} lists probed: recall@10 {recall:.3f}, table scanned {scanned:.3f}")
