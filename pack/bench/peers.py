"""Shard peers for the pack benchmark (scripts/bench-pack): the same samples (read from an imglish dataset with
pyarrow, all in memory before any clock starts) written with the peers' own writers as MosaicML Streaming MDS
shards (zstd, the same level as ours) and as WebDataset tar shards, then read back once with their own readers in
one process, decoding every field. Prints one JSON line per format, then (when the imglish results written by
pack/examples/bench.rs are given) a markdown table with every format side by side and the ratios.

usage: python peers.py DATASET WORKDIR [IMGLISH_JSON]
"""

import json
import os
import shutil
import sys
import tarfile
import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc


def samples(dataset):
    index = json.load(open(os.path.join(dataset, "index.json")))
    for s in index["shards"]:
        with pa.memory_map(os.path.join(dataset, s["file"])) as src:
            reader = ipc.open_file(src)
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                n = batch.num_rows
                tokens = batch.column("tokens").flatten().flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
                crops = batch.column("crops").flatten().flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
                flips = batch.column("flips").flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
                caps = batch.column("captions").to_pylist()
                ids = batch.column("sample_id").to_numpy()
                labels = batch.column("label").to_pylist()
                split = batch.column("split").to_numpy()
                for r in range(n):
                    yield {
                        "sample_id": int(ids[r]),
                        "tokens": tokens[r].astype(np.uint16),
                        "crops": crops[r].astype(np.uint32),
                        "flips": flips[r].astype(np.uint8),
                        "captions": caps[r],
                        "label": -1 if labels[r] is None else int(labels[r]),
                        "split": int(split[r]),
                    }


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def mds(rows, work, level):
    from streaming import MDSWriter, StreamingDataset

    out = os.path.join(work, "mds")
    shutil.rmtree(out, ignore_errors=True)
    columns = {"sample_id": "int64", "tokens": "ndarray:uint16", "crops": "ndarray:uint32",
               "flips": "ndarray:uint8", "captions": "json", "label": "int32", "split": "uint8"}
    t = time.perf_counter()
    with MDSWriter(out=out, columns=columns, compression=f"zstd:{level}", size_limit=1 << 26) as w:
        for r in rows:
            w.write({**r, "split": np.uint8(r["split"]), "label": np.int32(r["label"])})
    write_s = time.perf_counter() - t
    size = dir_bytes(out) - os.path.getsize(os.path.join(out, "index.json"))
    cache = os.path.join(work, "mds-cache")
    shutil.rmtree(cache, ignore_errors=True)
    ds = StreamingDataset(local=out, shuffle=False, batch_size=1)
    t, cpu = time.perf_counter(), time.process_time()
    n = 0
    checksum = 0
    for s in ds:
        checksum += int(s["tokens"][0]) + len(s["captions"])
        n += 1
    return size, write_s, n, time.perf_counter() - t, time.process_time() - cpu, checksum


def wds(rows, work):
    import webdataset as wds_

    out = os.path.join(work, "wds")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    pattern = os.path.join(out, "shard-%06d.tar")
    t = time.perf_counter()
    with wds_.ShardWriter(pattern, maxsize=1 << 26) as sink:
        for r in rows:
            sink.write({"__key__": f"{r['sample_id']:020d}", "tokens.u16": r["tokens"].tobytes(),
                        "crops.u32": r["crops"].tobytes(), "flips.u8": r["flips"].tobytes(),
                        "captions.json": json.dumps(r["captions"]).encode(), "cls": str(r["label"]).encode(),
                        "split.txt": str(r["split"]).encode()})
    write_s = time.perf_counter() - t
    size = dir_bytes(out)
    shards = sorted(os.path.join(out, f) for f in os.listdir(out))
    t, cpu = time.perf_counter(), time.process_time()
    n = 0
    checksum = 0
    for s in wds_.WebDataset(shards, shardshuffle=False, empty_check=False):
        tokens = np.frombuffer(s["tokens.u16"], dtype=np.uint16)
        np.frombuffer(s["crops.u32"], dtype=np.uint32)
        np.frombuffer(s["flips.u8"], dtype=np.uint8)
        caps = json.loads(s["captions.json"])
        int(s["cls"])
        checksum += int(tokens[0]) + len(caps)
        n += 1
    return size, write_s, n, time.perf_counter() - t, time.process_time() - cpu, checksum


def main():
    dataset, work = sys.argv[1], sys.argv[2]
    ours = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else None
    os.makedirs(work, exist_ok=True)
    level = json.load(open(os.path.join(dataset, "index.json")))["config"]["zstd_level"]
    rows = list(samples(dataset))
    peers = {}
    for name, fn in [("mds", lambda: mds(rows, work, level)), ("webdataset", lambda: wds(rows, work))]:
        size, write_s, n, secs, cpu, checksum = fn()
        if n != len(rows):
            sys.exit(f"peers.py: {name} read {n} samples back, wrote {len(rows)}")
        peers[name] = {"format": name, "samples": n, "bytes_per_sample": size / n, "write_s": write_s,
                       "samples_per_s": n / secs, "samples_per_cpu_s": n / cpu, "checksum": checksum}
        print(json.dumps(peers[name]))
    if ours is None:
        return
    n, raw = ours["samples"], ours["raw_bytes"]
    if n != len(rows):
        sys.exit(f"peers.py: {sys.argv[3]} is for {n} samples, the dataset has {len(rows)}")
    mb = raw / 1e6
    stream = ours["stream_samples_per_s"]
    ours_read = stream["none"]["cpu"]
    print()
    print(f"{n} samples, 2 views x 14x14 tokens (vocab 8192) + 1 caption + crops/flips/label; one process, one core")
    print()
    print("| format | bytes/sample | vs MDS+zstd | build MB/s (raw tokens) | read samples/s | per CPU s | imglish per CPU s ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    mds_b = peers["mds"]["bytes_per_sample"]
    print(f"| raw u16 tokens (.bin, tokens only) | {raw / n:.1f} | {raw / n / mds_b:.2f}x | | | | |")
    print(f"| imglish shards (zstd {level}) | {ours['imglish_bytes'] / n:.1f} | {ours['imglish_bytes'] / n / mds_b:.2f}x "
          f"| {mb / ours['build_s']:.1f} | {stream['none']['wall']:,.0f} | {ours_read:,.0f} | 1x |")
    for name, label in [("mds", f"MosaicML Streaming MDS (zstd:{level})"), ("webdataset", "WebDataset tar")]:
        p = peers[name]
        print(f"| {label} | {p['bytes_per_sample']:.1f} | {p['bytes_per_sample'] / mds_b:.2f}x | "
              f"{mb / p['write_s']:.1f} | {p['samples_per_s']:,.0f} | {p['samples_per_cpu_s']:,.0f} | "
              f"{ours_read / p['samples_per_cpu_s']:.0f}x |")
    print()
    slowest = min(v["cpu"] for v in stream.values())
    best_peer = max(p["samples_per_cpu_s"] for p in peers.values())
    print("imglish read orders, samples per CPU second: "
          + ", ".join(f"{k} {v['cpu']:,.0f}" for k, v in stream.items())
          + f"; the slowest order is {slowest / best_peer:.0f}x the faster peer per CPU second")


if __name__ == "__main__":
    main()
