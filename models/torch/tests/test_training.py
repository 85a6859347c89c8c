"""A model trained by either implementation evaluates to the same metrics in both, and a
torchrun (DDP, 2 CPU processes) training produces an artifact `xsrec eval` serves unchanged."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import ROOT, xsrec_bin
from xsrec_torch import XsrecModel, load_artifact
from xsrec_torch.data import build_sequences, load_events
from xsrec_torch.evaluate import rank_cases, split_metrics

SMALL = ["--epochs", "2", "--max-len", "20", "--d-model", "16", "--layers", "1"]


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "events.csv"
    subprocess.run([xsrec_bin(), "data", "synth", "--users", "150", "--items", "60", "--seed", "9", "--out", str(path)], check=True)
    return path


def rust_eval(model_dir, data, tmp_path):
    report = tmp_path / "eval.json"
    subprocess.run([xsrec_bin(), "eval", "--model", str(model_dir), "--data", str(data), "--json-out", str(report)],
                   check=True, capture_output=True)
    return json.loads(report.read_text())


def assert_same_metrics(ours, theirs):
    for split in ("validation", "test"):
        for subset in ("all", "new_session", "same_session"):
            a, b = ours[split][subset], theirs[split][subset]
            assert a["cases"] == b["cases"], (split, subset)
            assert a["means"].keys() == b["means"].keys(), (split, subset)
            for key in a["means"]:
                assert abs(a["means"][key] - b["means"][key]) < 1e-9, (split, subset, key)


def test_rust_trained_model_evaluates_identically_in_torch(log, tmp_path):
    model_dir = tmp_path / "rust-model"
    subprocess.run([xsrec_bin(), "train", "--data", str(log), "--out", str(model_dir), "--quiet", *SMALL], check=True,
                   capture_output=True)
    artifact = load_artifact(model_dir)
    model = XsrecModel(artifact.model_config)
    model.load_state_dict(artifact.state_dict, strict=True)
    model.eval()
    sequences = build_sequences(load_events(log), artifact.item_ids, artifact.config["event_types"])
    ours = {target: split_metrics(rank_cases(model, sequences, target)) for target in ("validation", "test")}
    assert_same_metrics(ours, rust_eval(model_dir, log, tmp_path))


def test_torchrun_ddp_training_is_served_by_xsrec(log, tmp_path):
    out = tmp_path / "ddp-model"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "models" / "torch"), OMP_NUM_THREADS="1")
    torchrun = pathlib.Path(sys.executable).with_name("torchrun")
    # --standalone: a free local port for the rendezvous, so a busy 29500 cannot fail the run.
    run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "xsrec_torch.train",
                          "--data", str(log), "--out", str(out), *SMALL], env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout}\n{run.stderr}"
    config = json.loads((out / "config.json").read_text())
    assert config["info"]["world_size"] == 2
    assert config["model"]["features"]["event_type"] is True
    assert_same_metrics(config["info"]["metrics"], rust_eval(out, log, tmp_path))


def test_the_learning_rate_decay_matches_the_rust_trainers_and_ends_the_run(log, tmp_path):
    from xsrec_torch.train import main, scheduled_lr, windows

    # The values src/train/mod.rs's schedule test asserts for `xsrec train`.
    assert scheduled_lr(0.002, None, 7.5) == 0.002
    assert scheduled_lr(0.002, 4, 0.0) == 0.002
    assert abs(scheduled_lr(0.002, 4, 1.0) - 0.002 * (2 + math.sqrt(2)) / 4) < 1e-15
    assert abs(scheduled_lr(0.002, 4, 2.0) - 0.001) < 1e-15
    assert abs(scheduled_lr(0.002, 4, 9.0)) < 1e-15
    out = tmp_path / "decayed"
    main(["--data", str(log), "--out", str(out), *SMALL, "--epochs", "9", "--lr-decay-epochs", "3"])
    epochs = json.loads((out / "epochs.json").read_text())
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all(a["elapsed_secs"] < b["elapsed_secs"] for a, b in zip(epochs, epochs[1:]))
    # An epoch's rate is its windows over its own time (not the run's so far), which lies inside
    # the time between two log entries.
    count = len(windows(build_sequences(load_events(str(log))), 20, 1800))
    since_previous = [b["elapsed_secs"] - a for a, b in zip([0.0] + [e["elapsed_secs"] for e in epochs], epochs)]
    assert all(e["sequences_per_sec"] * d >= count for e, d in zip(epochs, since_previous))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_both_losses_match_a_per_target_softmax_written_out(log, seed):
    """The training loss, with the user's earlier items left out of the softmax (default) or kept
    in it (--loss-keep-seen), against each target's log-softmax computed one by one."""
    import random

    import torch

    from xsrec_torch.features import batch, trim
    from xsrec_torch.train import loss_of, parse_args, windows

    torch.manual_seed(seed)
    sequences = build_sequences(load_events(str(log)))
    examples = windows(sequences, 20, 1800)
    chunk = random.Random(seed).sample(examples, 8)
    rows = trim([r for r, _, _ in chunk])
    width = len(rows[0]["items"])
    targets = torch.tensor([t[-width:] for _, t, _ in chunk])
    unshown = [u for _, _, u in chunk]
    assert any(unshown), "some windows start after their user's first event"
    cfg = {
        "arch": "transformer", "num_items": len(sequences.item_ids) + 1,
        "num_event_types": len(sequences.event_types) + 1, "max_len": 20, "d_model": 16, "n_heads": 2, "n_layers": 1,
        "ffn_dim": 32, "dropout": 0.0, "tied_output": True,
        "features": {"session_recency": True, "time_gap": True, "event_type": True, "prediction_gap": True,
                     "calendar": False, "session_successor": False, "clock_readout": False,
                     "session_summary": False, "combine": "sum", "session_cap": 8},
        "session_gap_secs": 1800,
    }
    model = XsrecModel(cfg).eval()
    assert parse_args(["--data", "x", "--out", "y", "--loss-keep-seen"]).loss_keep_seen
    with torch.no_grad():
        logits = model.score(model.hidden(batch(rows, torch.device("cpu"))))
        kept, left_out = [], []
        for b, row in enumerate(rows):
            for t in range(width):
                goal = int(targets[b, t])
                if goal == 0:
                    continue
                scores = logits[b, t].double()
                kept.append(-(scores[goal] - torch.logsumexp(scores, 0)))
                # Padding (0) and every item at or before t are out, except the target itself.
                out = {0} | {int(i) for i in row["items"][: t + 1]}
                allowed = [v for v in range(cfg["num_items"]) if v not in out or v == goal]
                left_out.append(-(scores[goal] - torch.logsumexp(scores[allowed], 0)))
        for keep_seen, oracle in ((True, kept), (False, left_out)):
            loss = loss_of(model, model, rows, targets, cfg["num_items"], keep_seen)
            assert abs(float(loss) - float(torch.stack(oracle).mean())) < 1e-5, keep_seen
        assert float(torch.stack(left_out).mean()) < float(torch.stack(kept).mean())

        # With the repeat term, each item the row's user had at or before t, before the window
        # too (its target too, padding never), gets the offset its hidden state reads.
        cfg["features"]["repeat_term"] = True
        repeating = XsrecModel(cfg).eval()
        repeating.load_state_dict(model.state_dict(), strict=False)
        repeating.repeat_term.gate.weight.normal_(0, 1.0)
        repeating.repeat_term.gate.bias.fill_(-0.7)
        hidden = repeating.hidden(batch(rows, torch.device("cpu")))
        offsets = repeating.repeat_offsets(hidden)
        raised = []
        for b, row in enumerate(rows):
            for t in range(width):
                goal = int(targets[b, t])
                if goal == 0:
                    continue
                scores = logits[b, t].double().clone()
                for item in ({int(i) for i in row["items"][: t + 1]} | set(unshown[b])) - {0}:
                    scores[item] += float(offsets[b, t])
                raised.append(-(scores[goal] - torch.logsumexp(scores, 0)))
        loss = loss_of(repeating, repeating, rows, targets, cfg["num_items"], True, unshown)
        assert abs(float(loss) - float(torch.stack(raised).mean())) < 1e-5
        assert abs(float(torch.stack(raised).mean()) - float(torch.stack(kept).mean())) > 1e-3


@pytest.mark.parametrize("seed", range(8))
def test_grouped_batches_cover_every_window_once_sorted_within_runs_of_32(seed):
    import random

    from xsrec_torch.train import batch_plan

    rng = random.Random(seed)
    batch_size = rng.randint(1, 9)
    lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 900))]
    # The plan's first draw is the shuffled order; replay it to know each window's run of 32 batches.
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    run_of = {i: position // (batch_size * 32) for position, i in enumerate(order)}
    padding = {}
    for grouped in (True, False):
        plan = batch_plan(lengths, batch_size, random.Random(seed), grouped)
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
        assert all(1 <= len(b) <= batch_size for b in plan)
        assert len(plan) == -(-len(lengths) // batch_size)
        assert all(len({run_of[i] for i in b}) == 1 for b in plan)
        padding[grouped] = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plan)
        if grouped:
            # Sorted before being cut: two batches of one run never overlap in length.
            for a in plan:
                for b in plan:
                    if a is not b and run_of[a[0]] == run_of[b[0]]:
                        assert max(lengths[i] for i in a) <= min(lengths[i] for i in b) or \
                            max(lengths[i] for i in b) <= min(lengths[i] for i in a)
    assert padding[True] <= padding[False]


@pytest.mark.parametrize("field, message", [
    ("1700000000000", "x.csv:3: timestamp '1700000000000' is past the year 9999 in seconds; this twin reads seconds only"),
    ("1e30", "x.csv:3: timestamp '1e30' is past the year 9999 in seconds$"),
    ("-5", "x.csv:3: timestamp '-5' is negative"),
    ("-0.5", "x.csv:3: timestamp '-0.5' is negative"),
])
def test_timestamps_the_rust_loader_refuses_are_refused_naming_the_line(tmp_path, field, message):
    log = tmp_path / "x.csv"
    log.write_text(f"user_id,item_id,timestamp\nu1,i1,5\nu1,i2,{field}\n")
    with pytest.raises(ValueError, match=message):
        load_events(log)
    # The last second of the year 9999 is still a second, a fraction of it too.
    log.write_text("user_id,item_id,timestamp\nu1,i1,253402300799.5\n")
    assert load_events(log) == [("u1", "i1", 253402300799, None)]
