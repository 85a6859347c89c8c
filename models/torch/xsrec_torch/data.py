"""Event logs and the leave-one-out split, producing exactly the indices `xsrec train` assigns.

Formats as in the Rust loaders (by file name): RecBole `.inter` (tab, `name:type` header),
MovieLens `u.data` (`*.data`, tab) and `ratings.dat` (`*.dat`, `::`), and CSV/TSV with a header
naming user_id, item_id, timestamp and optionally event_type. This twin trusts its input: the
Rust loader is the one that reports malformed rows. Timestamps are Unix seconds; one it could
not read as the Rust loader does (negative, or past the year 9999, as milliseconds are) is
refused, since it would otherwise train on other sessions than `xsrec train` builds.
"""
import pathlib
from dataclasses import dataclass

# The last second of the year 9999, as in the Rust loader (data/event.rs).
MAX_TIMESTAMP = 253_402_300_799


def seconds(field, where):
    number = float(field)
    if number < 0:
        raise ValueError(f"{where}: timestamp {field!r} is negative")
    value = int(number)
    if value > MAX_TIMESTAMP:
        # The hint only where milliseconds would be in range, as the Rust loader gives it.
        hint = "; this twin reads seconds only (`xsrec train --timestamp-unit ms` reads milliseconds)"
        raise ValueError(f"{where}: timestamp {field!r} is past the year 9999 in seconds"
                         + (hint if int(number / 1000) <= MAX_TIMESTAMP else ""))
    return value


def load_events(path):
    path = pathlib.Path(path)
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    suffix = path.suffix.lower()
    if suffix in (".data", ".dat"):
        delim = "\t" if suffix == ".data" else "::"
        cols, body = {"user_id": 0, "item_id": 1, "timestamp": 3}, lines
    else:
        delim = {".inter": "\t", ".csv": ",", ".tsv": "\t"}[suffix]
        names = [n.strip().split(":")[0] if suffix == ".inter" else n.strip() for n in lines[0].split(delim)]
        cols = {n: i for i, n in enumerate(names)}
        body = lines[1:]
    events = []
    first_line = len(lines) - len(body) + 1
    for number, line in enumerate(body, start=first_line):
        if not line.strip():
            continue
        f = line.split(delim)
        event_type = f[cols["event_type"]] if "event_type" in cols and f[cols["event_type"]] else None
        timestamp = seconds(f[cols["timestamp"]], f"{path.name}:{number}")
        events.append((f[cols["user_id"]], f[cols["item_id"]], timestamp, event_type))
    return events


@dataclass
class User:
    user_id: str
    items: list
    timestamps: list
    types: list

    def train_len(self):
        return len(self.items) - 2 if len(self.items) >= 3 else len(self.items)

    def target_position(self, target):
        if len(self.items) < 3:
            return None
        return len(self.items) - (2 if target == "validation" else 1)


@dataclass
class Sequences:
    users: list
    item_ids: list  # index i + 1 -> id
    event_types: list  # index i + 1 -> name ("" = untyped)

    def train_item_counts(self):
        counts = [0] * (len(self.item_ids) + 1)
        for u in self.users:
            for item in u.items[: u.train_len()]:
                counts[item] += 1
        return counts


def build_sequences(events, item_ids=None, event_types=None):
    """Users in order of first appearance, events stably sorted by time; a given vocabulary is
    fixed (unknown items dropped), otherwise it grows in that same order."""
    grow = item_ids is None
    item_ids = list(item_ids or [])
    event_types = list(event_types or [""])
    item_index = {item: i + 1 for i, item in enumerate(item_ids)}
    type_index = {name: i + 1 for i, name in enumerate(event_types)}
    grouped = {}
    for event in events:
        grouped.setdefault(event[0], []).append(event)
    users = []
    for user_id, user_events in grouped.items():
        user_events.sort(key=lambda e: e[2])
        items, timestamps, types = [], [], []
        for _, item, ts, event_type in user_events:
            if item not in item_index:
                if not grow:
                    continue
                item_ids.append(item)
                item_index[item] = len(item_ids)
            name = event_type or ""
            if name not in type_index and grow:
                event_types.append(name)
                type_index[name] = len(event_types)
            items.append(item_index[item])
            timestamps.append(ts)
            types.append(type_index.get(name, 1))
        if items:
            users.append(User(user_id, items, timestamps, types))
    return Sequences(users, item_ids, event_types)
