"""Full-ranking evaluation with the rules of src/eval: seen items (but not the target) excluded,
ties counted against the target, the metrics of src/eval/metrics.rs."""
import math

import torch

from .features import batch, encode, trim

HIT_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)


def case_metrics(rank, candidates):
    out = {}
    for k in HIT_KS:
        hit = 1.0 if rank < k else 0.0
        precision = hit / k
        out[f"HR@{k}"] = hit
        out[f"P@{k}"] = precision
        out[f"F1@{k}"] = 2 * precision * hit / (precision + hit) if hit else 0.0
    for k in NDCG_KS:
        out[f"NDCG@{k}"] = 1.0 / math.log2(rank + 2) if rank < k else 0.0
    out["MRR"] = 1.0 / (rank + 1)
    out["AUC"] = 1.0 - rank / (candidates - 1) if candidates > 1 else 1.0
    return out


@torch.no_grad()
def rank_cases(model, sequences, target, exclude_seen=True, batch_size=256, device="cpu"):
    """(user index, rank, candidates, new_session) for every user with a `target` event."""
    cfg = model.cfg
    cases = [(u, p) for u, user in enumerate(sequences.users) if (p := user.target_position(target)) is not None]
    out = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        rows = []
        for u, p in chunk:
            user = sequences.users[u]
            rows.append(encode(user.items[:p], user.timestamps[:p], user.types[:p], user.timestamps[p], cfg["max_len"], cfg["session_gap_secs"]))
        held = [sequences.users[u].items[:p] for u, p in chunk]
        scores = model.score_next(batch(trim(rows), device), held).float()
        scores[:, 0] = float("-inf")
        for row, (u, p) in enumerate(chunk):
            user = sequences.users[u]
            goal = user.items[p]
            if exclude_seen:
                seen = sorted({i for i in user.items[:p] if i != goal})
                scores[row, seen] = float("-inf")
                masked = 1 + len(seen)
            else:
                masked = 1
            rank = int((scores[row] >= scores[row, goal]).sum().item()) - 1
            new_session = user.timestamps[p] - user.timestamps[p - 1] > cfg["session_gap_secs"]
            out.append((u, rank, scores.shape[1] - masked, new_session))
    return out


def metrics(cases):
    sums = {}
    for _, rank, candidates, _ in cases:
        for key, value in case_metrics(rank, candidates).items():
            sums[key] = sums.get(key, 0.0) + value
    return {"cases": len(cases), "means": {k: v / max(len(cases), 1) for k, v in sorted(sums.items())}}


def split_metrics(cases):
    return {
        "all": metrics(cases),
        "new_session": metrics([c for c in cases if c[3]]),
        "same_session": metrics([c for c in cases if not c[3]]),
    }
