"""The peer of `imglish finetune` in the fine-tuning benchmark: the same BEiT encoder (train/tests/reference) with
mean pooling, `fc_norm` and a linear head, fine-tuned the way a user of the reference BEiT code would from our
shards: pyarrow reads the Arrow IPC shards, a torch `IterableDataset` + `DataLoader` yields labelled views,
`torch.optim.AdamW` steps with BEiT's layer-wise learning-rate decay groups, label-smoothed cross-entropy.
Prints one JSON line with the timing.

usage: python torch_finetune.py DATASET FINETUNE_CONFIG.json STEPS THREADS [WORKERS]
(FINETUNE_CONFIG.json is the `config.json` that `imglish finetune` wrote, so both loops train the same model.)
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
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))
from beit_reference import BeitForMaskedImageModeling  # noqa: E402


class Classifier(nn.Module):
    """BEiT with `global_pool='avg'`: blocks, mean of the patch outputs, fc_norm, head (no final norm)."""

    def __init__(self, cfg, classes):
        super().__init__()
        self.encoder = BeitForMaskedImageModeling(cfg)
        del self.encoder.lm_head, self.encoder.norm
        self.fc_norm = nn.LayerNorm(cfg["dim"], eps=cfg["layer_norm_eps"])
        self.head = nn.Linear(cfg["dim"], classes)

    def forward(self, x):
        e = self.encoder
        x = e.token_embed(x) if e.tokens_input else e.patch_embed(x)
        x = torch.cat((e.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if e.pos_embed is not None:
            x = x + e.pos_embed
        rel = e.rel_pos_bias() if e.rel_pos_bias is not None else None
        for blk in e.blocks:
            x = blk(x, rel)
        return self.head(self.fc_norm(x[:, 1:].mean(1)))


class Shards(torch.utils.data.IterableDataset):
    def __init__(self, dataset, n, seed):
        index = json.load(open(os.path.join(dataset, "index.json")))
        self.files = [os.path.join(dataset, s["file"]) for s in index["shards"] if s["split"] == "train"]
        self.n, self.seed = n, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        files = self.files if info is None else self.files[info.id::info.num_workers]
        rng = random.Random(self.seed)
        while True:
            order = list(files)
            rng.shuffle(order)
            for path in order:
                with pa.memory_map(path) as source:
                    reader = ipc.open_file(source)
                    for b in range(reader.num_record_batches):
                        batch = reader.get_batch(b)
                        labels = batch.column("label").to_pylist()
                        views = batch.column("tokens").to_pylist()
                        for label, vs in zip(labels, views):
                            if label is None or not vs:
                                continue
                            view = np.asarray(vs[rng.randrange(len(vs))], dtype=np.int64)
                            yield torch.from_numpy(view), label


def layer_id(name, depth):
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    if name.startswith("encoder."):
        return 0
    return depth + 1


def main():
    dataset, config_path, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    workers = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    torch.set_num_threads(threads)
    run = json.load(open(config_path))
    cfg = run["backbone"]["beit"]
    assert cfg["drop_path"] == 0 and not run["mix"]["mixup"] and not run["mix"]["cutmix"], \
        "the reference has no stochastic depth or mixing: benchmark with --drop-path 0 and no mixup/CutMix"
    torch.manual_seed(run["seed"])
    model = Classifier(cfg, run["classes"])
    depth, o = cfg["depth"], run["optim"]
    groups = {}
    for name, p in model.named_parameters():
        if name == "encoder.mask_token":
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or name.endswith(("cls_token", "pos_embed")) \
            or "relative_position_bias_table" in name
        lid = layer_id(name, depth)
        key = (lid, skip)
        g = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if skip else o["weight_decay"],
                                    "scale": run["layer_decay"] ** (depth + 1 - lid)})
        g["params"].append(p)
    opt = torch.optim.AdamW(list(groups.values()), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])
    loader = torch.utils.data.DataLoader(
        Shards(dataset, cfg["grid"][0] * cfg["grid"][1], run["seed"]), batch_size=run["stream"]["batch_size"],
        num_workers=workers, prefetch_factor=4 if workers > 0 else None, persistent_workers=workers > 0)
    it = iter(loader)
    model.train()
    start = time.perf_counter()
    waited = 0.0
    for step in range(steps):
        lr = o["lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        t = time.perf_counter()
        tokens, labels = next(it)
        waited += time.perf_counter() - t
        loss = F.cross_entropy(model(tokens), labels, label_smoothing=run["label_smoothing"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    print(json.dumps({"steps": steps, "seconds": seconds, "data_wait": waited / seconds, "loss": loss.item()}))


if __name__ == "__main__":
    main()
