"""Reads imglish shards with polars' own IPC reader (no imglish code) and prints one JSON line per row, for
`pack/tests/interop.rs` to compare with what was written. usage: python interop_read.py SHARD.arrow..."""

import hashlib
import json
import sys

import polars as pl

for path in sys.argv[1:]:
    frame = pl.read_ipc(path)
    for row in frame.iter_rows(named=True):
        pixels = row.get("pixels")
        print(json.dumps({
            "sample_id": row["sample_id"],
            "tokens": [list(v) for v in row["tokens"]],
            "crops": [list(c) for c in row["crops"]],
            "flips": list(row["flips"]),
            "captions": [list(c) for c in row["captions"]],
            "label": row["label"],
            "split": row["split"],
            "pixels_sha256": None if pixels is None else hashlib.sha256(pixels).hexdigest(),
        }))
