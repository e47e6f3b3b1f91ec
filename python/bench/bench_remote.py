"""Remote streaming vs local disk (scripts/bench-remote): the same packed dataset read by `imglish.StreamingDataset`
(one epoch of the train split, batches of 64, BEiT batches, no DataLoader workers) from a folder on local disk and
from a moto S3 server on 127.0.0.1 (started here), with an empty shard cache (cold) and with the cache the cold run
left (warm: a new process, so cached shards are hashed again before use). Each read runs in a process of its own;
rounds alternate. Prints a table of samples/s and MB/s.

usage: python bench_remote.py IMGLISH TOKENS MANIFEST WORK ROUNDS
"""

import json
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import s3_server  # noqa: E402

# Small shards, so that a small corpus makes many objects (the per-object cost is what remote reading adds).
SHARD_BYTES = 256 << 10

READ = """
import json, sys, time
import imglish
path, cache = sys.argv[1], sys.argv[2]
imglish.set_cache(cache_dir=cache, cache_limit=64 << 30, prefetch=2)
t = time.perf_counter()
ds = imglish.StreamingDataset(path, 64, model="beit", split="train")
n = sum(len(b["sample_ids"]) for b in ds)
print(json.dumps({"samples": n, "seconds": time.perf_counter() - t}))
"""


def main():
    imglish, tokens, manifest, work, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    server, env = s3_server.start(sys.executable, "bench")
    try:
        local, url = os.path.join(work, "local"), "s3://bench/dataset"
        for out in (local, url):
            subprocess.run([imglish, "-q", "pack", "--tokens", tokens, "--manifest", manifest, "--include-pixels",
                            "--target-shard-bytes", str(SHARD_BYTES), "--batch-rows", "16", "--out", out, "--cache-dir",
                            os.path.join(work, "staging")], env=env, check=True)
        with open(os.path.join(local, "index.json")) as f:
            index = json.load(f)
        train_bytes = sum(s["bytes"] for s in index["shards"] if s["split"] == "train")

        def read(path, cache):
            r = subprocess.run([sys.executable, "-W", "ignore", "-c", READ, path, cache], env=env, check=True,
                               capture_output=True, text=True)
            return json.loads(r.stdout.strip().splitlines()[-1])

        results = {"local disk": [], "S3 (moto), cold cache": [], "S3 (moto), warm cache": []}
        for _ in range(rounds):
            cache = os.path.join(work, "cache")
            shutil.rmtree(cache, ignore_errors=True)
            results["local disk"].append(read(local, cache))
            results["S3 (moto), cold cache"].append(read(url, cache))
            results["S3 (moto), warm cache"].append(read(url, cache))
        n = results["local disk"][0]["samples"]
        print(f"streaming one epoch of the train split: {n} samples, {len(index['shards'])} shards, "
              f"{train_bytes / 1e6:.1f} MB of train shards, {rounds} rounds (median)")
        print("| source | seconds | samples/s | MB/s | vs local |")
        print("|---|---:|---:|---:|---:|")
        base = statistics.median(r["seconds"] for r in results["local disk"])
        for name, runs in results.items():
            assert all(r["samples"] == n for r in runs), (name, runs)
            s = statistics.median(r["seconds"] for r in runs)
            print(f"| {name} | {s:.2f} | {n / s:.0f} | {train_bytes / 1e6 / s:.1f} | {base / s:.2f}x |")
    finally:
        s3_server.stop(server)


if __name__ == "__main__":
    main()
