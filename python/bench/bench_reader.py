"""Reader and DDP benchmarks for scripts/bench-python: prints markdown tables.

1. Samples/s and samples per CPU-second (this process and its DataLoader workers) of
   ``imglish.StreamingDataset`` in a DataLoader against ``webdataset`` over tar shards of the same samples
   (visual tokens of one view, caption token ids, label; written here from the imglish dataset), same workers,
   same batch size, same run. imglish does more per sample (the epoch's view, the MIM mask, BEiT-3's kind draw
   and text masking); webdataset only decodes.
2. Step time of ``python -m imglish.pretrain`` with 2 ranks (gloo, CPU) against 1 rank, same global batch.

usage: python bench_reader.py DATASET WORKDIR [--workers W] [--batch B] [--epochs E]
"""

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.ipc as ipc
import torch

import imglish


def cpu_seconds():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def write_tars(dataset, out, per_tar=256):
    """The train split as WebDataset tars: KEY.tokens.npy (view 0), KEY.captions.json, KEY.cls."""
    os.makedirs(out, exist_ok=True)
    ds = imglish.Dataset(dataset)
    rows = []
    for shard in ds.shards:
        if shard["split"] != "train":
            continue
        table = ipc.open_file(os.path.join(dataset, shard["file"])).read_all().to_pylist()
        rows += table
    names = []
    for t in range(0, len(rows), per_tar):
        name = os.path.join(out, f"shard-{t // per_tar:05}.tar")
        with tarfile.open(name, "w") as tar:
            for r in rows[t : t + per_tar]:
                key = f"{r['sample_id']:020}"
                tokens = np.asarray(r["tokens"][0] if r["tokens"] else [], dtype=np.uint16)
                buf = io.BytesIO()
                np.save(buf, tokens)
                for ext, data in (
                    ("tokens.npy", buf.getvalue()),
                    ("captions.json", json.dumps(r["captions"]).encode()),
                    ("cls", str(r["label"] if r["label"] is not None else -1).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        names.append(name)
    return names, len(rows)


def measure(loader, count):
    """(samples, seconds, CPU-seconds) to drain the loader."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    n = 0
    for batch in loader:
        n += count(batch)
    return n, time.perf_counter() - t0, cpu_seconds() - c0


def bench_imglish(dataset, workers, batch, epochs, model):
    ds = imglish.StreamingDataset(dataset, batch, model=model)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    total = [0, 0.0, 0.0]
    for e in range(epochs):
        ds.set_epoch(e)
        n, s, c = measure(loader, lambda b: b["__len__"])
        total = [total[0] + n, total[1] + s, total[2] + c]
    return total


def bench_webdataset(tars, workers, batch, epochs):
    import webdataset as wds

    def collate(samples):
        tokens = torch.stack([torch.from_numpy(s[0].astype(np.int64)) for s in samples])
        return tokens, [s[1] for s in samples], torch.tensor([int(s[2]) for s in samples])

    pipe = (
        wds.WebDataset(tars, shardshuffle=False, empty_check=False)
        .decode()
        .to_tuple("tokens.npy", "captions.json", "cls")
        .batched(batch, collation_fn=collate)
    )
    loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=workers)
    total = [0, 0.0, 0.0]
    for _ in range(epochs):
        n, s, c = measure(loader, lambda b: len(b[2]))
        total = [total[0] + n, total[1] + s, total[2] + c]
    return total


def write_mds(dataset, out):
    """The train split as MosaicML MDS shards: tokens (view 0), captions, label; uncompressed."""
    from streaming import MDSWriter

    subprocess.run(["rm", "-rf", out], check=True)
    ds = imglish.Dataset(dataset)
    columns = {"tokens": "ndarray:uint16", "captions": "json", "label": "int"}
    with MDSWriter(out=out, columns=columns) as w:
        for shard in ds.shards:
            if shard["split"] != "train":
                continue
            for r in ipc.open_file(os.path.join(dataset, shard["file"])).read_all().to_pylist():
                tokens = np.asarray(r["tokens"][0] if r["tokens"] else [], dtype=np.uint16)
                w.write({"tokens": tokens, "captions": r["captions"], "label": r["label"] if r["label"] is not None else -1})


def bench_mosaic(mds, workers, batch, epochs):
    from streaming import StreamingDataset as MosaicDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()

    def collate(samples):
        tokens = [torch.from_numpy(s["tokens"].astype(np.int64)) for s in samples]
        return tokens, [s["captions"] for s in samples], torch.tensor([s["label"] for s in samples])

    ds = MosaicDataset(local=mds, batch_size=batch, shuffle=True, shuffle_seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate)
    total = [0, 0.0, 0.0]
    for _ in range(epochs):
        n, s, c = measure(loader, lambda b: len(b[2]))
        total = [total[0] + n, total[1] + s, total[2] + c]
    return total


def bench_ddp(dataset, work, steps, batch):
    rows = []
    for nproc in (1, 2):
        out = os.path.join(work, f"ddp-{nproc}")
        subprocess.run(["rm", "-rf", out], check=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd += ["-m", "imglish.pretrain", "--dataset", dataset, "--out", out, "--steps", str(steps)]
        cmd += ["--batch-size", str(batch), "--workers", "1", "--threads", "1", "--log-every", str(steps)]
        cmd += ["--dim", "192", "--depth", "4", "--heads", "3"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        wall = time.perf_counter() - t0
        with open(os.path.join(out, "metrics.jsonl")) as f:
            m = [json.loads(line) for line in f][-1]
        rows.append((nproc, wall, m["samples_per_s"]))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dataset")
    p.add_argument("work")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--ddp-steps", type=int, default=30)
    a = p.parse_args()
    tars, n = write_tars(a.dataset, os.path.join(a.work, "wds"))
    results = {}
    try:
        import streaming

        mds = os.path.join(a.work, "mds")
        write_mds(a.dataset, mds)
        mosaic = [(f"MosaicML Streaming {streaming.__version__} (MDS; decode only)", lambda: bench_mosaic(mds, a.workers, a.batch, a.epochs))]
    except ImportError:
        print("(mosaicml-streaming is not installed: no MosaicML row)", file=sys.stderr)
        mosaic = []
    for name, fn in mosaic + [
        ("imglish.StreamingDataset (BEiT: view + mask)", lambda: bench_imglish(a.dataset, a.workers, a.batch, a.epochs, "beit")),
        ("imglish.StreamingDataset (BEiT-3: kinds, text masks)", lambda: bench_imglish(a.dataset, a.workers, a.batch, a.epochs, "beit3")),
        ("webdataset 1.0.2 (tar; decode only)", lambda: bench_webdataset(tars, a.workers, a.batch, a.epochs)),
    ]:
        fn()  # warm-up: page cache, worker start-up code paths
        results[name] = fn()
    print(f"\nReader: {n} train samples x {a.epochs} epochs, {a.workers} DataLoader workers, batch {a.batch}\n")
    refs = [n for n in results if n.startswith("MosaicML")] or ["webdataset 1.0.2 (tar; decode only)"]
    ref = results[refs[0]]
    print(f"| reader | samples/s | samples per CPU-second | vs {refs[0].split(' (')[0]} (per CPU-second) |")
    print("|---|---|---|---|")
    for name, (k, s, c) in results.items():
        print(f"| {name} | {k / s:,.0f} | {k / c:,.0f} | {(k / c) / (ref[0] / ref[2]):.2f}x |")
    rows = bench_ddp(a.dataset, a.work, a.ddp_steps, 32)
    print(f"\nDDP (gloo, CPU, 1 thread per rank): BEiT-3 dim 192 depth 4, global batch 32, {a.ddp_steps} steps\n")
    print("| ranks | samples/s (last window) | wall s (incl. start-up) |")
    print("|---|---|---|")
    for nproc, wall, sps in rows:
        print(f"| {nproc} | {sps:,.1f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
