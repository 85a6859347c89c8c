"""The xsrec networks in PyTorch; parameter names equal the Rust VarStore names (models/README.md)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .features import DAYS_PER_WEEK, HOURS_PER_DAY, NUM_GAP_BUCKETS


def _embedding(rows, dim):
    e = nn.Embedding(rows, dim)
    nn.init.normal_(e.weight, 0.0, 0.02)
    return e


class Block(nn.Module):
    def __init__(self, d, heads, ffn, dropout):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn_in = nn.Linear(d, ffn)
        self.ffn_out = nn.Linear(ffn, d)
        self.heads, self.dropout = heads, dropout

    def forward(self, x, bias, weights_out=None):
        b, l, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        p = self.dropout if self.training else 0.0
        if weights_out is None:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        else:
            w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads) + bias, dim=-1)
            weights_out.append(w)
            attended = F.dropout(w, p, self.training) @ v
        x = x + F.dropout(self.attn_out(attended.transpose(1, 2).reshape(b, l, d)), self.dropout, self.training)
        h = self.ffn_out(F.dropout(F.gelu(self.ffn_in(self.ffn_norm(x))), self.dropout, self.training))
        return x + F.dropout(h, self.dropout, self.training)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, f = cfg["d_model"], cfg["features"]
        self.n_layers, self.cap = cfg["n_layers"], f["session_cap"]
        for i in range(cfg["n_layers"]):
            setattr(self, f"block{i}", Block(d, cfg["n_heads"], cfg["ffn_dim"], cfg["dropout"]))
        self.session_bias = nn.Embedding(self.cap + 1, cfg["n_heads"]) if f["session_recency"] else None
        if self.session_bias is not None:
            nn.init.zeros_(self.session_bias.weight)
        self.final_norm = nn.LayerNorm(d)

    def attention_bias(self, batch):
        items, sessions = batch["items"], batch["sessions"]
        b, l = items.shape
        causal = torch.ones(l, l, dtype=torch.bool, device=items.device).tril()
        eye = torch.eye(l, dtype=torch.bool, device=items.device)
        allowed = causal.unsqueeze(0) & ((items != 0).unsqueeze(1) | eye.unsqueeze(0))
        if self.session_bias is not None:
            distance = (sessions.unsqueeze(2) - sessions.unsqueeze(1)).clamp(0, self.cap)
            bias = self.session_bias(distance).permute(0, 3, 1, 2)
        else:
            bias = torch.zeros(b, 1, l, l, device=items.device)
        return bias.masked_fill(~allowed.unsqueeze(1), float("-inf"))

    def forward(self, x, batch, weights_out=None):
        bias = self.attention_bias(batch)
        for i in range(self.n_layers):
            x = getattr(self, f"block{i}")(x, bias, weights_out)
        return self.final_norm(x)


def previous_session_mean(batch, item_vectors):
    """For each position, the mean item vector of the real events of the session before its own:
    sums per session index read back (O(L·d)), in the Rust model's order of operations, so that
    the two round alike."""
    sessions = batch["sessions"]
    real = (batch["items"] != 0).to(item_vectors.dtype)
    by_session = sessions.unsqueeze(-1).expand_as(item_vectors)
    sums = torch.zeros_like(item_vectors).scatter_add(1, by_session, item_vectors * real.unsqueeze(-1))
    counts = torch.zeros_like(real).scatter_add(1, sessions, real).clamp_min(1.0)
    means = sums / counts.unsqueeze(-1)
    before = (sessions - 1).clamp_min(0).unsqueeze(-1).expand_as(item_vectors)
    has_before = (sessions > 0).unsqueeze(-1).to(item_vectors.dtype)
    return means.gather(1, before) * has_before


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _zero_gate(d):
    gate = nn.Linear(d, 1)
    nn.init.zeros_(gate.weight)
    nn.init.zeros_(gate.bias)
    return gate


def _earlier_sessions(batch):
    sessions = batch["sessions"]
    return (sessions.unsqueeze(1) < sessions.unsqueeze(2)) & (batch["items"] != 0).unsqueeze(1)


def _read_or_nothing(logits, allowed, item_vectors):
    b, l = logits.shape[0], logits.shape[1]
    logits = logits.masked_fill(~allowed, float("-inf"))
    null = torch.zeros(b, l, 1, dtype=item_vectors.dtype, device=item_vectors.device)
    return torch.cat([null, logits], -1).softmax(-1)[..., 1:] @ item_vectors


def _hour_and_day(hours_of_week):
    real = (hours_of_week > 0).long()
    since_monday = (hours_of_week - 1).clamp_min(0)
    return (since_monday % HOURS_PER_DAY + 1) * real, (since_monday // HOURS_PER_DAY + 1) * real


class Calendar(nn.Module):
    """Hour-of-day plus day-of-week embedding of hour-of-week numbers (0 = padding)."""

    def __init__(self, d):
        super().__init__()
        self.calendar_hour_embedding = _embedding(1 + HOURS_PER_DAY, d)
        self.calendar_day_embedding = _embedding(1 + DAYS_PER_WEEK, d)

    def forward(self, hours_of_week):
        hour, day = _hour_and_day(hours_of_week)
        return self.calendar_hour_embedding(hour) + self.calendar_day_embedding(day)


class SessionSuccessor(nn.Module):
    """What followed earlier sessions like the current one (see `SessionSuccessor` in src/model/net.rs)."""

    def __init__(self, d):
        super().__init__()
        self.sharpness = nn.Parameter(torch.tensor([10.0]))
        self.threshold = nn.Parameter(torch.tensor([0.5]))
        self.gate = _zero_gate(d)

    def retrieve(self, batch, item_vectors):
        sessions, real = batch["sessions"], batch["items"] != 0
        l = sessions.shape[1]
        causal = torch.ones(l, l, dtype=torch.bool, device=sessions.device).tril().unsqueeze(0)
        so_far = ((sessions.unsqueeze(2) == sessions.unsqueeze(1)) & causal & real.unsqueeze(1)).to(item_vectors.dtype)
        current = (so_far / so_far.sum(-1, keepdim=True).clamp_min(1.0)) @ item_vectors
        before = previous_session_mean(batch, item_vectors)
        has_before = before.abs().sum(-1) > 0
        similarity = (_unit(current) @ _unit(before).transpose(1, 2) - self.threshold) * self.sharpness
        return _read_or_nothing(similarity, _earlier_sessions(batch) & has_before.unsqueeze(1), item_vectors)


CLOCK_DIM = 16


class RepeatTerm(nn.Module):
    """A score offset, read from the hidden state, for the items the window holds (see `repeat_term` in src/model/config.rs)."""

    def __init__(self, d):
        super().__init__()
        self.gate = _zero_gate(d)


class ClockReadout(nn.Module):
    """What the user did in earlier sessions at a time like the moment of prediction (see `ClockReadout` in src/model/net.rs)."""

    def __init__(self, d):
        super().__init__()
        self.query = Calendar(CLOCK_DIM)
        self.key = Calendar(CLOCK_DIM)
        self.gate = _zero_gate(d)

    def retrieve(self, batch, item_vectors):
        hours = batch["prediction_hours"]
        own_hours = torch.cat([torch.zeros_like(hours[:, :1]), hours[:, :-1]], 1)
        logits = self.query(hours) @ self.key(own_hours).transpose(1, 2) / math.sqrt(CLOCK_DIM)
        return _read_or_nothing(logits, _earlier_sessions(batch) & (own_hours > 0).unsqueeze(1), item_vectors)


class Lstm(nn.LSTM):
    """nn.LSTM plus the output LayerNorm, so parameters are named lstm.weight_ih_l0, lstm.norm.*."""

    def __init__(self, cfg):
        d = cfg["d_model"]
        super().__init__(d, d, num_layers=cfg["n_layers"], batch_first=True, dropout=cfg["dropout"])
        self.norm = nn.LayerNorm(d)

    def forward(self, x, batch, weights_out=None):
        out, _ = super().forward(x)
        return self.norm(out)


class XsrecModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, f = cfg["d_model"], cfg["features"]
        self.item_embedding = _embedding(cfg["num_items"], d)
        self.position_embedding = _embedding(cfg["max_len"], d)
        self.gap_embedding = _embedding(NUM_GAP_BUCKETS, d) if f["time_gap"] else None
        self.type_embedding = _embedding(cfg["num_event_types"], d) if f["event_type"] else None
        self.prediction_gap_embedding = _embedding(NUM_GAP_BUCKETS, d) if f["prediction_gap"] else None
        # Artifacts older than the calendar feature have no such key: off.
        calendar = f.get("calendar", False)
        self.calendar_hour_embedding = _embedding(1 + HOURS_PER_DAY, d) if calendar else None
        self.calendar_day_embedding = _embedding(1 + DAYS_PER_WEEK, d) if calendar else None
        # Likewise for the readouts.
        self.session_successor = SessionSuccessor(d) if f.get("session_successor", False) else None
        self.clock_readout = ClockReadout(d) if f.get("clock_readout", False) else None
        self.repeat_term = RepeatTerm(d) if f.get("repeat_term", False) else None
        # Likewise for the previous session's summary.
        self.session_summary_projection = nn.Linear(d, d) if f.get("session_summary", False) else None
        parts = 2 + sum(bool(f.get(k, False)) for k in ("time_gap", "event_type", "prediction_gap", "calendar", "session_summary"))
        self.concat_projection = nn.Linear(parts * d, d) if f["combine"] == "concat" else None
        if cfg["arch"] == "transformer":
            self.transformer = Transformer(cfg)
        else:
            self.lstm = Lstm(cfg)
        self.output_embedding = None if cfg["tied_output"] else _embedding(cfg["num_items"], d)
        self.dropout = cfg["dropout"]

    def embed(self, batch):
        items = batch["items"]
        b, l = items.shape
        max_len = self.position_embedding.num_embeddings
        if self.cfg["features"].get("positions", "newest") == "window-start":
            # Counted from the window's oldest event: rows are left-padded, so a row's first real
            # event is position 0 (padding reads position 0 too, and is masked), as in Rust.
            positions = ((items != 0).long().cumsum(1) - 1).clamp_min(0)
        else:
            positions = torch.arange(max_len - l, max_len, device=items.device).unsqueeze(0).expand(b, l)
        item_vectors = self.item_embedding(items)
        parts = [item_vectors, self.position_embedding(positions)]
        for table, key in ((self.gap_embedding, "gaps"), (self.type_embedding, "types"), (self.prediction_gap_embedding, "prediction_gaps")):
            if table is not None:
                parts.append(table(batch[key]))
        if self.calendar_hour_embedding is not None:
            # Hour of day plus day of week of the hour-of-week number (0 = padding), as in Rust.
            hour, day = _hour_and_day(batch["prediction_hours"])
            parts.append(self.calendar_hour_embedding(hour) + self.calendar_day_embedding(day))
        if self.session_summary_projection is not None:
            parts.append(self.session_summary_projection(previous_session_mean(batch, item_vectors)))
        if self.concat_projection is not None:
            merged = self.concat_projection(torch.cat(parts, -1))
        else:
            merged = parts[0]
            for part in parts[1:]:
                merged = merged + part
        return F.dropout(merged, self.dropout, self.training) * (items != 0).unsqueeze(-1).to(merged.dtype)

    def hidden(self, batch, weights_out=None):
        encoder = self.transformer if self.cfg["arch"] == "transformer" else self.lstm
        hidden = encoder(self.embed(batch), batch, weights_out)
        for readout in (self.session_successor, self.clock_readout):
            if readout is not None:
                hidden = hidden + readout.gate(hidden) * readout.retrieve(batch, self.item_embedding(batch["items"]))
        return hidden

    def item_table(self):
        return (self.output_embedding or self.item_embedding).weight

    def score(self, hidden):
        return hidden @ self.item_table().T

    def repeat_offsets(self, hidden):
        """[...]: what the repeat term adds to the items each hidden state's window holds (None without it)."""
        return None if self.repeat_term is None else self.repeat_term.gate(hidden).squeeze(-1)

    def score_next(self, batch, held=None):
        """[B, V] next-item scores; `held[row]`: the items of the row's whole history (the window
        shows only its newest), which the repeat term raises."""
        hidden = self.hidden(batch)[:, -1]
        scores = self.score(hidden)
        offsets = self.repeat_offsets(hidden)
        if offsets is None:
            return scores
        had = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, batch["items"], True)
        for row, items in enumerate(held or []):
            had[row, list(items)] = True
        had[:, 0] = False
        return scores + offsets.unsqueeze(1) * had
