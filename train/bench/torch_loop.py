"""The peer of `imglish train` in the training benchmark: the same BEiT model (train/tests/reference), trained the
way a user of the reference BEiT code would feed it from our shards: pyarrow reads the Arrow IPC shards, a
torch `IterableDataset` + `DataLoader` yields batches, BEiT's MaskingGenerator (numpy) draws the masks, and
`torch.optim.AdamW` with BEiT's parameter groups steps. Prints one JSON line with the timing.

usage: python torch_loop.py DATASET RUN_CONFIG.json STEPS THREADS [WORKERS]
(RUN_CONFIG.json is the `config.json` that `imglish train` wrote, so both loops train the same model.)
"""

import json
import math
import os
import random
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))
from beit_reference import BeitForMaskedImageModeling  # noqa: E402


class MaskingGenerator:
    """BEiT's blockwise masking (unilm beit/masking_generator.py), numpy RNG."""

    def __init__(self, grid, count, min_block):
        self.h, self.w = grid
        self.count, self.min_block = count, min_block
        self.log_aspect = (math.log(0.3), math.log(1 / 0.3))

    def _mask(self, mask, remaining):
        delta = 0
        for _ in range(10):
            area = random.uniform(self.min_block, remaining)
            aspect = math.exp(random.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.w and h < self.h:
                top, left = random.randint(0, self.h - h), random.randint(0, self.w - w)
                new = h * w - mask[top:top + h, left:left + w].sum()
                if 0 < new <= remaining:
                    mask[top:top + h, left:left + w] = 1
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(self):
        mask = np.zeros((self.h, self.w), dtype=np.int64)
        have = 0
        while have < self.count:
            d = self._mask(mask, self.count - have)
            if d == 0:
                break
            have += d
        return mask.reshape(-1).astype(bool)


class Shards(torch.utils.data.IterableDataset):
    def __init__(self, dataset, masking, seed):
        index = json.load(open(os.path.join(dataset, "index.json")))
        self.files = [os.path.join(dataset, s["file"]) for s in index["shards"] if s["split"] == "train"]
        self.masking, self.seed = masking, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        files = self.files if info is None else self.files[info.id::info.num_workers]
        rng = random.Random(self.seed)
        epoch = 0
        while True:
            order = list(files)
            rng.shuffle(order)
            for path in order:
                with pa.memory_map(path) as source:
                    reader = ipc.open_file(source)
                    for b in range(reader.num_record_batches):
                        batch = reader.get_batch(b)
                        rows = batch.num_rows
                        tokens = batch.column("tokens").flatten().flatten().to_numpy(zero_copy_only=False)
                        tokens = tokens.reshape(rows, -1, self.masking.h * self.masking.w)
                        for r in range(rows):
                            view = rng.randrange(tokens.shape[1])
                            yield torch.from_numpy(tokens[r, view].astype(np.int64)), torch.from_numpy(self.masking())
            epoch += 1


def main():
    dataset, config_path, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    workers = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    torch.set_num_threads(threads)
    run = json.load(open(config_path))
    cfg = run["model"]
    m = run["masking"]
    torch.manual_seed(run["seed"])
    random.seed(run["seed"])
    model = BeitForMaskedImageModeling(cfg)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "mask_token", "pos_embed")
        (no_decay if skip or "relative_position_bias_table" in name else decay).append(p)
    o = run["optim"]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])
    masking = MaskingGenerator(cfg["grid"], m["count"], m["min_block"])
    loader = torch.utils.data.DataLoader(
        Shards(dataset, masking, run["seed"]), batch_size=run["stream"]["batch_size"], num_workers=workers,
        prefetch_factor=4 if workers > 0 else None, persistent_workers=workers > 0)
    it = iter(loader)
    model.train()
    start = time.perf_counter()
    waited = 0.0
    for step in range(steps):
        lr = o["lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        t = time.perf_counter()
        tokens, mask = next(it)
        waited += time.perf_counter() - t
        _, logits = model(tokens, mask)
        loss = F.cross_entropy(logits, tokens[mask])
        opt.zero_grad()
        loss.backward()
        if o["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_grad"])
        opt.step()
    seconds = time.perf_counter() - start
    print(json.dumps({"steps": steps, "seconds": seconds, "data_wait": waited / seconds, "loss": loss.item()}))


if __name__ == "__main__":
    main()
