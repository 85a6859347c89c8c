"""History -> model input, exactly as src/model/input.rs and src/data/session.rs define it."""
import torch

GAP_BUCKET_PAD = 0
GAP_BUCKET_NONE = 1
LOG2_BUCKETS = 32
NUM_GAP_BUCKETS = 2 + 2 * LOG2_BUCKETS
HOURS_PER_DAY = 24
DAYS_PER_WEEK = 7


def starts_new_session(gap, session_gap):
    return gap > session_gap


def session_indices(timestamps, session_gap):
    out, session = [], 0
    for i, ts in enumerate(timestamps):
        if i > 0 and starts_new_session(ts - timestamps[i - 1], session_gap):
            session += 1
        out.append(session)
    return out


def gap_bucket(gap, session_gap):
    g = max(gap, 0)
    log2 = min((g + 1).bit_length() - 1, LOG2_BUCKETS - 1)
    return 2 + 2 * log2 + int(starts_new_session(gap, session_gap))


def hour_of_week(timestamp):
    """1 (Monday 00:00 UTC) to 168; 0 is padding. 1970-01-01 was a Thursday."""
    return 1 + (timestamp // 3600 + 3 * 24) % (7 * 24)


def encode(items, timestamps, types, predict_at, max_len, session_gap):
    """Left-padded row of the newest `max_len` events: dict of six lists of length max_len."""
    n = len(items)
    start = max(0, n - max_len)
    pad = max_len - (n - start)
    row = {k: [0] * max_len for k in ("items", "types", "gaps", "prediction_gaps", "sessions", "prediction_hours")}
    sessions = session_indices(timestamps[start:], session_gap)
    for offset, i in enumerate(range(start, n)):
        j = pad + offset
        row["items"][j] = items[i]
        row["types"][j] = types[i]
        row["gaps"][j] = GAP_BUCKET_NONE if i == 0 else gap_bucket(timestamps[i] - timestamps[i - 1], session_gap)
        next_ts = timestamps[i + 1] if i + 1 < n else predict_at
        row["prediction_gaps"][j] = gap_bucket(next_ts - timestamps[i], session_gap)
        row["prediction_hours"][j] = hour_of_week(next_ts)
        row["sessions"][j] = sessions[offset]
    return row


def trim(rows):
    """Drop leading columns that are padding in every row (as trim_to_longest does)."""
    width = max(1, max(sum(1 for _ in _real_tail(r["items"])) for r in rows))
    return [{k: v[-width:] for k, v in r.items()} for r in rows]


def _real_tail(items):
    for item in reversed(items):
        if item == 0:
            return
        yield item


def batch(rows, device="cpu"):
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.int64, device=device) for k in rows[0]}
