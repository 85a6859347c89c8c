"""Reads and writes the artifact directory documented in models/README.md (format_version 1).

safetensors is a small format (8-byte little-endian header length, a JSON header, raw
little-endian tensor bytes), read and written here with torch alone.
"""
import json
import pathlib
import struct
from dataclasses import dataclass, field

import torch

FORMAT_VERSION = 1
_DTYPES = {"F32": torch.float32, "I64": torch.int64}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_safetensors(path):
    data = pathlib.Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    body = data[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"]).clone()
    return tensors


def write_safetensors(tensors, path):
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.numpy().tobytes()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


@dataclass
class Artifact:
    config: dict
    item_ids: list  # index i + 1 -> external id
    item_counts: list = field(default_factory=list)  # per index, padding first
    item_categories: list = field(default_factory=list)  # per index, padding first
    state_dict: dict = field(default_factory=dict)

    @property
    def model_config(self):
        return self.config["model"]


def load_artifact(directory):
    directory = pathlib.Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}/config.json: format_version {config.get('format_version')} is not supported")
    lines = (directory / "items.tsv").read_text().splitlines()
    if lines[0] != "index\titem_id\tcount\tcategories":
        raise ValueError(f"{directory}/items.tsv:1: unexpected header")
    ids, counts, categories = [], [0], [[]]
    for line in lines[1:]:
        index, item_id, count, cats = line.split("\t")
        assert int(index) == len(ids) + 1, f"items.tsv: index {index} out of order"
        ids.append(item_id)
        counts.append(int(count))
        categories.append([c for c in cats.split("|") if c])
    return Artifact(config, ids, counts, categories, read_safetensors(directory / "model.safetensors"))


def save_artifact(artifact, directory):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(artifact.config, indent=2) + "\n")
    write_safetensors(artifact.state_dict, directory / "model.safetensors")
    counts = artifact.item_counts or [0] * (len(artifact.item_ids) + 1)
    categories = artifact.item_categories or [[] for _ in range(len(artifact.item_ids) + 1)]
    rows = ["index\titem_id\tcount\tcategories"]
    rows += [f"{i}\t{item}\t{counts[i]}\t{'|'.join(categories[i])}" for i, item in enumerate(artifact.item_ids, start=1)]
    (directory / "items.tsv").write_text("\n".join(rows) + "\n")
