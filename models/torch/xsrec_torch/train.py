"""Train the xsrec model with PyTorch, alone or under torchrun (DistributedDataParallel), and write
an artifact that `xsrec eval` / `xsrec serve` use unchanged.

    python -m xsrec_torch.train --data data/ml-100k/ml-100k.inter --out runs/torch
    torchrun --nproc_per_node=2 -m xsrec_torch.train --data events.csv --out runs/ddp

Same data formats, split, windows, loss (full softmax with the user's earlier items left out)
and early stopping as `xsrec train`; gloo on CPU, nccl on GPU. Rank 0 evaluates and writes.
"""
import argparse
import ctypes
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .artifact import Artifact, save_artifact
from .data import build_sequences, load_events
from .evaluate import rank_cases, split_metrics
from .features import batch, encode, trim
from .model import XsrecModel


def windows(sequences, max_len, session_gap):
    """(encoded input row, targets, the user's items before the window) per window, newest window
    of each user first (as Rust)."""
    out = []
    for user in sequences.users:
        n = user.train_len()
        last_target = n
        while last_target >= 2:
            b = last_target - 1
            row = encode(user.items[:b], user.timestamps[:b], user.types[:b], user.timestamps[b], max_len, session_gap)
            length = min(b, max_len)
            targets = [0] * max_len
            for slot, event in enumerate(range(b + 1 - length, b + 1)):
                targets[max_len - length + slot] = user.items[event]
            out.append((row, targets, user.items[: b - length]))
            last_target -= max_len
    return out


def seen_before(items, num_items):
    """[B, L, V] bool: item v occurs at or before position t (padding always counts as seen)."""
    b, l = items.shape
    positions = torch.arange(l, device=items.device).expand(b, l)
    first = torch.full((b, num_items), l, dtype=torch.int64, device=items.device)
    first.scatter_reduce_(1, items, positions, reduce="amin")
    # A row as long as the batch has no padding to scatter; its column is out all the same (as
    # `xsrec train` leaves it out), not only in rows that are padded.
    first[:, 0] = 0
    return first.unsqueeze(1) <= positions.unsqueeze(2)


def loss_of(model, module, rows, targets, num_items, keep_seen=False, unshown=None):
    """Mean cross-entropy of the targets; `unshown[row]`: the user's items before the row's window
    (the repeat term raises them as well)."""
    x = batch(rows, targets.device)
    hidden = model(x) if model is not module else module.hidden(x)
    keep = targets.view(-1) != 0
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    goal = targets.view(-1)[keep]
    logits = module.score(hidden)
    if keep_seen and module.repeat_term is None:
        return F.cross_entropy(logits, goal)
    seen = seen_before(x["items"], num_items)
    if keep_seen:
        # The repeat term raises the items each position's user had (padding is none), its target too.
        for row, items in enumerate(unshown or []):
            seen[row, :, list(items)] = True
        seen = seen.view(-1, num_items)[keep]
        seen[:, 0] = False
        return F.cross_entropy(logits + module.repeat_offsets(hidden).unsqueeze(1) * seen, goal)
    seen = seen.view(-1, num_items)[keep]
    seen[torch.arange(len(goal), device=goal.device), goal] = False
    return F.cross_entropy(logits.masked_fill(seen, float("-inf")), goal)


def batch_plan(lengths, batch_size, rng, grouped=True):
    """Indices of each step's windows. Grouped (as `xsrec train`'s batch_plan): shuffle, sort each
    run of 32 batches' windows by real length and cut it into batches, shuffle the batches, so
    little compute goes to padding while batch order stays random. Otherwise plain shuffled
    chunks."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not grouped:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    for start in range(0, len(order), batch_size * 32):
        group = sorted(order[start : start + batch_size * 32], key=lambda i: lengths[i])
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


class HiddenOnly(torch.nn.Module):
    """DDP wraps forward(); ours returns hidden states so the loss stays outside."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.hidden(x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--arch", choices=["transformer", "lstm"], default="transformer")
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn-dim", type=int)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--combine", choices=["sum", "concat"], default="sum")
    p.add_argument("--session-gap", type=int, default=1800)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-decay-epochs", type=int, help="decay the learning rate along a half cosine to zero over this many epochs, and stop there")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--batching", choices=["grouped", "shuffled"], default="shuffled",
                   help="shuffled: plain shuffled chunks (default, as `xsrec train`: better models); grouped: batches of windows of similar length, less padding")
    p.add_argument("--loss-keep-seen", action="store_true", help="keep already-seen items in the training softmax (by default they are left out, as in evaluation)")
    p.add_argument("--repeat-term", action="store_true", help="learn a score offset for the items the user already had (needs --loss-keep-seen)")
    for feature in ("session-recency", "time-gap", "event-type", "prediction-gap", "session-successor", "clock-readout"):
        p.add_argument(f"--no-{feature}", action="store_true")
    p.add_argument("--calendar", action="store_true", help="hour-of-day and day-of-week embeddings shared by all users")
    p.add_argument("--session-summary", action="store_true", help="each event reads the previous session's mean item vector")
    args = p.parse_args(argv)
    if args.repeat_term and not args.loss_keep_seen:
        p.error("--repeat-term needs --loss-keep-seen: with seen items out of the softmax nothing teaches it")
    return args


def keep_freed_pages():
    """Ask glibc to keep freed memory instead of unmapping it. Every step frees logits of
    hundreds of MB, above glibc's largest mmap threshold (32 MiB), so each step's allocations were
    fresh mappings faulted in page by page: a quarter of an ML-1M epoch's CPU time was the kernel's
    (the Rust trainer keeps its pages for the same reason, src/train/pages.rs). Served from the
    heap and never trimmed, the pages are reused by the next step."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: its allocator makes its own choices
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def scheduled_lr(lr, decay_epochs, epochs_done):
    """The learning rate `epochs_done` (fractional) epochs into a run, as `xsrec train` sets it."""
    if not decay_epochs:
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(epochs_done / decay_epochs, 1.0)))


def main(argv=None):
    args = parse_args(argv)
    keep_freed_pages()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    sequences = build_sequences(load_events(args.data))
    has_types = any(t != "" for t in sequences.event_types)
    cfg = {
        "arch": args.arch, "num_items": len(sequences.item_ids) + 1, "num_event_types": len(sequences.event_types) + 1,
        "max_len": args.max_len, "d_model": args.d_model, "n_heads": args.heads, "n_layers": args.layers,
        "ffn_dim": args.ffn_dim or 4 * args.d_model, "dropout": args.dropout, "tied_output": True,
        "features": {
            "session_recency": not args.no_session_recency, "time_gap": not args.no_time_gap,
            "event_type": not args.no_event_type and has_types, "prediction_gap": not args.no_prediction_gap,
            "calendar": args.calendar, "session_successor": not args.no_session_successor,
            "clock_readout": not args.no_clock_readout, "repeat_term": args.repeat_term,
            "session_summary": args.session_summary, "combine": args.combine, "session_cap": 8,
        },
        "session_gap_secs": args.session_gap,
    }
    model = XsrecModel(cfg).to(device)
    trainer = HiddenOnly(model)
    if distributed:
        trainer = torch.nn.parallel.DistributedDataParallel(trainer, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    examples = windows(sequences, args.max_len, args.session_gap)
    lengths = [sum(1 for item in row["items"] if item != 0) for row, _, _ in examples]
    best = (float("-inf"), 0, None)
    log = []
    started = time.time()
    for epoch in range(1, min(args.epochs, args.lr_decay_epochs or args.epochs) + 1):
        model.train()
        plan = batch_plan(lengths, args.batch_size, rng, args.batching == "grouped")  # same seed on every rank
        mine = plan[rank::world] or plan[:1]
        # Equal step counts on every rank, or DDP's all-reduce would wait forever: a rank one batch
        # short repeats its first.
        steps = -(-len(plan) // world)
        total = 0.0
        epoch_started = time.time()
        for step in range(steps):
            chunk = [examples[i] for i in (mine[step] if step < len(mine) else mine[0])]
            rows = trim([r for r, _, _ in chunk])
            width = len(rows[0]["items"])
            targets = torch.tensor([t[-width:] for _, t, _ in chunk], device=device)
            loss = loss_of(trainer, model, rows, targets, cfg["num_items"], args.loss_keep_seen, [u for _, _, u in chunk])
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(args.lr, args.lr_decay_epochs, epoch - 1 + step / steps)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            total += loss.item()
        model.eval()
        stop = torch.zeros(1)
        if rank == 0:
            ndcg = split_metrics(rank_cases(model, sequences, "validation", device=device))["all"]["means"].get("NDCG@10", 0.0)
            # All ranks' sequences over the epoch's time with validation, as `xsrec train` counts.
            sequences_per_sec = len(examples) / (time.time() - epoch_started)
            log.append({"epoch": epoch, "train_loss": total / max(steps, 1), "validation_ndcg10": ndcg,
                        "sequences_per_sec": sequences_per_sec, "elapsed_secs": time.time() - started})
            print(f"epoch {epoch}: loss {total / max(steps, 1):.4f} val NDCG@10 {ndcg:.4f} "
                  f"{sequences_per_sec:.0f} seq/s ({time.time() - started:.0f} s)", flush=True)
            if ndcg > best[0]:
                best = (ndcg, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
            stop[0] = float(epoch - best[1] >= args.patience)
        if distributed:
            dist.broadcast(stop, 0)
        if stop.item():
            break
    if rank == 0:
        model.load_state_dict(best[2])
        model.eval()
        validation = split_metrics(rank_cases(model, sequences, "validation", device=device))
        test = split_metrics(rank_cases(model, sequences, "test", device=device))
        info = {
            "trainer": "models/torch (PyTorch)", "world_size": world, "best_epoch": best[1], "epochs_run": len(log),
            "train_seconds": time.time() - started, "data": {"source": args.data, "users": len(sequences.users),
            "items": len(sequences.item_ids)}, "metrics": {"validation": validation, "test": test},
        }
        artifact = Artifact(
            config={"format_version": 1, "model": cfg, "event_types": sequences.event_types, "info": info},
            item_ids=sequences.item_ids, item_counts=sequences.train_item_counts(),
            state_dict={k: v.cpu() for k, v in model.state_dict().items()},
        )
        save_artifact(artifact, args.out)
        with open(os.path.join(args.out, "epochs.json"), "w") as f:
            json.dump(log, f, indent=2)
        print(f"best epoch {best[1]}; test NDCG@10 {test['all']['means'].get('NDCG@10', 0):.4f}; wrote {args.out}", flush=True)
    if distributed:
        # Ranks leave together, and leave without tearing gloo down: a rank that destroys its
        # process group while rank 0 is still evaluating and saving aborts in gloo's threads
        # ("terminate called without an active exception"), and with a barrier first one still
        # did, once, under load (2026-12-05: a std::thread destroyed while joinable as the DDP
        # wrapper's group went away). Everything is written by now (rank 0 saved before the
        # barrier); the OS closes the sockets.
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
