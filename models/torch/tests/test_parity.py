"""Rust and PyTorch compute the same model: random weights, random histories, every feature switch."""
import json
import random
import subprocess

import pytest
import torch

from conftest import xsrec_bin
from xsrec_torch import Artifact, XsrecModel, encode, load_artifact, save_artifact
from xsrec_torch.features import batch, gap_bucket, hour_of_week, session_indices

NUM_ITEMS, NUM_TYPES, MAX_LEN, GAP = 40, 4, 12, 1800


def config(**overrides):
    features = {"session_recency": True, "time_gap": True, "event_type": True, "prediction_gap": True, "calendar": True, "session_summary": True, "session_successor": True,
                "clock_readout": True, "combine": "sum", "session_cap": 3}
    features.update(overrides.pop("features", {}))
    cfg = {
        "arch": "transformer", "num_items": NUM_ITEMS, "num_event_types": NUM_TYPES, "max_len": MAX_LEN,
        "d_model": 16, "n_heads": 2, "n_layers": 2, "ffn_dim": 24, "dropout": 0.1, "tied_output": True,
        "features": features, "session_gap_secs": GAP,
    }
    cfg.update(overrides)
    return cfg


VARIANTS = {
    "all-sum": config(),
    "all-concat": config(features={"combine": "concat"}),
    "window-start-positions": config(features={"positions": "window-start"}),
    "no-session-recency": config(features={"session_recency": False}),
    "no-time-gap": config(features={"time_gap": False}),
    "no-event-type": config(features={"event_type": False}),
    "no-prediction-gap": config(features={"prediction_gap": False}),
    "no-calendar": config(features={"calendar": False}),
    "no-session-summary": config(features={"session_summary": False}),
    "no-session-successor": config(features={"session_successor": False}),
    "no-clock-readout": config(features={"clock_readout": False}),
    "clock-readout-without-calendar": config(features={"calendar": False}),
    "plain-untied": config(tied_output=False, features={"session_recency": False, "time_gap": False, "event_type": False, "prediction_gap": False, "calendar": False,
                                                        "session_summary": False, "session_successor": False,
                                                        "clock_readout": False}),
    "one-layer-four-heads": config(n_layers=1, n_heads=4),
    "lstm": config(arch="lstm", tied_output=False),
    "lstm-concat": config(arch="lstm", features={"combine": "concat"}),
    "repeat-term": config(features={"repeat_term": True}),
    "lstm-repeat-term": config(arch="lstm", features={"repeat_term": True}),
}


def random_histories(rng, count):
    """Lengths from 1 to past max_len, sessions split by long gaps, equal timestamps included."""
    out = []
    for _ in range(count):
        n = rng.randint(1, MAX_LEN + 8)
        ts, t = [], rng.randint(0, 10**6)
        for _ in range(n):
            t += rng.choice([0, rng.randint(1, 600), rng.randint(GAP - 1, GAP + 1), rng.randint(4000, 10**6)])
            ts.append(t)
        at = ts[-1] + rng.choice([0, 30, GAP + 1, 86400 * 3])
        out.append({"items": [rng.randint(1, NUM_ITEMS - 1) for _ in range(n)], "timestamps": ts,
                    "types": [rng.randint(1, NUM_TYPES - 1) for _ in range(n)], "at": at})
    return out


def random_model(cfg, seed):
    torch.manual_seed(seed)
    model = XsrecModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" not in name else 0.2) + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


def rust_scores(model_dir, histories, tmp_path):
    source, target = tmp_path / "histories.jsonl", tmp_path / "scores.jsonl"
    source.write_text("".join(json.dumps(h) + "\n" for h in histories))
    subprocess.run([xsrec_bin(), "score", "--model", str(model_dir), "--input", str(source), "--out", str(target)], check=True)
    return torch.tensor([json.loads(line)["scores"] for line in target.read_text().splitlines()])


def save(model, cfg, directory):
    artifact = Artifact(
        config={"format_version": 1, "model": cfg, "event_types": [""] + [f"t{i}" for i in range(2, NUM_TYPES)], "info": {}},
        item_ids=[f"item{i}" for i in range(1, NUM_ITEMS)],
        state_dict=model.state_dict(),
    )
    save_artifact(artifact, directory)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_rust_and_torch_scores_match(name, tmp_path):
    cfg = VARIANTS[name]
    model = random_model(cfg, seed=len(name))
    save(model, cfg, tmp_path / "model")
    histories = random_histories(random.Random(name), 40)
    rows = [encode(h["items"], h["timestamps"], h["types"], h["at"], MAX_LEN, GAP) for h in histories]
    with torch.no_grad():
        ours = model.score_next(batch(rows), [h["items"] for h in histories])
    theirs = rust_scores(tmp_path / "model", histories, tmp_path)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, f"{name}: max abs diff {diff}"
    ours[:, 0] = theirs[:, 0] = float("-inf")
    assert torch.equal(ours.topk(10).indices, theirs.topk(10).indices), name


def test_artifact_round_trip_is_exact(tmp_path):
    cfg = VARIANTS["all-concat"]
    model = random_model(cfg, 1)
    save(model, cfg, tmp_path / "m")
    loaded = load_artifact(tmp_path / "m")
    again = XsrecModel(loaded.model_config)
    again.load_state_dict(loaded.state_dict, strict=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_features_match_the_documented_definitions():
    assert session_indices([0, 10, 1810, 3611, 3612, 100000], 1800) == [0, 0, 0, 1, 1, 2]
    assert [gap_bucket(g, 1800) for g in (0, 1, 2, 3, 1800, 1801, -5)] == [2, 4, 4, 6, 22, 23, 2]
    row = encode([5, 6, 7], [100, 110, 10000], [1, 2, 1], 10005, 5, 1800)
    assert row["items"] == [0, 0, 5, 6, 7]
    assert row["sessions"] == [0, 0, 0, 0, 1]
    assert row["prediction_gaps"] == [0, 0, gap_bucket(10, 1800), gap_bucket(9890, 1800), gap_bucket(5, 1800)]
    assert row["prediction_hours"] == [0, 0, hour_of_week(110), hour_of_week(10000), hour_of_week(10005)]
    monday = 1_600_041_600  # 2020-09-14 00:00:00 UTC
    assert [hour_of_week(t) for t in (monday, monday + 3600, monday - 1, monday + 7 * 86400 + 13 * 3600)] == [1, 2, 168, 14]


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_a_fresh_rust_model_starts_from_the_distributions_a_fresh_torch_model_does(arch, tmp_path):
    """Tensor by tensor, the spread of the initial weights matches: the two trainers start alike
    (tch's default Linear init draws weights √6 times wider than PyTorch's nn.Linear)."""
    subprocess.run([xsrec_bin(), "bench", "init-model", "--items", "3000", "--d-model", "64", "--max-len", "50",
                    "--arch", arch, "--out", str(tmp_path / "m")], check=True, capture_output=True)
    rust = load_artifact(tmp_path / "m")
    torch.manual_seed(0)
    fresh = XsrecModel(rust.model_config).state_dict()
    assert set(fresh) == set(rust.state_dict)
    for name, theirs in rust.state_dict.items():
        ours, theirs = fresh[name].double(), theirs.double()
        if ours.numel() < 2 or theirs.std() == 0 or ours.std() == 0:
            assert torch.equal(ours, theirs), f"{name}: a constant initialisation differs"
            continue
        # An estimated standard deviation is off by about 1/√(2n) relative.
        tolerance = 4 / (2 * ours.numel()) ** 0.5
        ratio = (theirs.std() / ours.std()).item()
        assert abs(ratio - 1) <= tolerance, f"{name}: Rust spread {ratio:.3f}× the torch one"
