"""The PyTorch twin of imglish's dVAE (`imglish tokenizer train-dvae`): the same layers under the same parameter
names (a checkpoint's model.safetensors loads with strict=True), and the same training step (Gumbel-softmax
relaxation and KL to the uniform prior, or a VQ codebook with moving averages and restarts; MSE or logit-Laplace
reconstruction; AdamW with clipping).

usage:
  python torch_dvae.py bench RUN_CONFIG.json STEPS THREADS [MANIFEST]
      the peer loop of scripts/bench-dvae: STEPS steps of the run's batch size, one JSON line with the seconds.
      With MANIFEST (an imglish ingest output), as a user would write it: a DataLoader (1 worker) reads the train
      split's image files with Pillow and cuts torchvision RandomResizedCrop(scale 0.6-1, bicubic) + flip views,
      as imglish does; without, on pre-made tensors (no data cost at all: the peer's upper bound).
"""

import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Dvae(nn.Module):
    """`model` is the `model` object of the run's config.json."""

    def __init__(self, model):
        super().__init__()
        self.cfg = model
        levels = int(math.log2(model["input_size"] // model["grid"]))
        w = lambda level: model["width"] << min(level, 2)  # noqa: E731
        k = model["codebook"]
        blocks = lambda level: nn.ModuleDict(  # noqa: E731
            {f"block{b}": ResBlock(w(level)) for b in range(model["blocks"])}
        )
        enc, dec = nn.Module(), nn.Module()
        enc.stem = nn.Conv2d(3, w(0), 3, padding=1)
        for level in range(1, levels + 1):
            setattr(enc, f"down{level}", nn.Conv2d(w(level - 1), w(level), 2, stride=2))
            setattr(enc, f"level{level}", blocks(level))
            setattr(dec, f"level{level}", blocks(level))
            setattr(dec, f"up{level}", nn.ConvTranspose2d(w(level), w(level - 1), 2, stride=2))
        q = model.get("quantizer", {"kind": "gumbel"})
        if q["kind"] == "vq":
            d = q["dim"]
            enc.proj = nn.Conv2d(w(levels), d, 1)
            self.quant = nn.Module()
            for name, shape in (("codebook", (k, d)), ("cluster_size", (k,)), ("embed_sum", (k, d))):
                self.quant.register_buffer(name, torch.zeros(shape))
            dec.embed = nn.Conv2d(d, w(levels), 1)
        else:
            enc.logits = nn.Conv2d(w(levels), k, 1)
            dec.embed = nn.Conv2d(k, w(levels), 1)
        self.vq = q["kind"] == "vq"
        out = 6 if model["recon"]["kind"] == "logit-laplace" else 3
        dec.out = nn.Conv2d(w(0), out, 3, padding=1)
        self.enc, self.dec, self.levels = enc, dec, levels

    def encode(self, x):
        h = self.enc.stem(x)
        for level in range(1, self.levels + 1):
            h = getattr(self.enc, f"down{level}")(F.relu(h))
            for b in getattr(self.enc, f"level{level}").values():
                h = b(h)
        return (self.enc.proj if self.vq else self.enc.logits)(F.relu(h))

    def decode(self, z):
        h = self.dec.embed(z)
        for level in range(self.levels, 0, -1):
            for b in getattr(self.dec, f"level{level}").values():
                h = b(h)
            h = getattr(self.dec, f"up{level}")(F.relu(h))
        return self.dec.out(F.relu(h))

    def recon_loss(self, out, x):
        r = self.cfg["recon"]
        if r["kind"] == "mse":
            return F.mse_loss(out, x)
        eps = r["eps"]
        mapped = x * (1 - 2 * eps) + eps
        target = torch.log(mapped / (1 - mapped))
        mu, log_b = out[:, :3], out[:, 3:]
        return ((target - mu).abs() * torch.exp(-log_b) + log_b).mean()

    def pixels(self, out):
        r = self.cfg["recon"]
        if r["kind"] == "mse":
            return out.clamp(0, 1)
        eps = r["eps"]
        return ((torch.sigmoid(out[:, :3]) - eps) / (1 - 2 * eps)).clamp(0, 1)


def vq_step_loss(model, x, target, decay, commitment):
    z = model.encode(x)
    b, d, g, _ = z.shape
    cb, cs, es = model.quant.codebook, model.quant.cluster_size, model.quant.embed_sum
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    codes = (flat.detach() @ cb.t() * 2 - cb.square().sum(1)[None]).argmax(1)
    zq = cb[codes].view(b, g, g, d).permute(0, 3, 1, 2)
    recon = model.recon_loss(model.decode(z + (zq - z).detach()), target)
    loss = recon + commitment * (z - zq.detach()).square().mean()
    with torch.no_grad():
        k = cb.shape[0]
        one_hot = F.one_hot(codes, k).float()
        cs.mul_(decay).add_(one_hot.sum(0) * (1 - decay))
        es.mul_(decay).add_(one_hot.t() @ flat.detach() * (1 - decay))
        n = cs.sum()
        cb.copy_(es / ((cs + 1e-5) / (n + 1e-5 * k) * n)[:, None])
        threshold = min(1.0, 0.5 * flat.shape[0] / k)
        dead = cs < threshold
        if dead.any():
            fresh = flat.detach()[torch.randint(flat.shape[0], (int(dead.sum()),))]
            cb[dead], es[dead], cs[dead] = fresh, fresh, threshold
    return loss


def step_loss(model, x, target, tau, kl_weight, straight_through):
    logits = model.encode(x)
    k = logits.shape[1]
    u = torch.rand_like(logits).clamp(1e-10, 1 - 1e-7)
    soft = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=1)
    if straight_through:
        hard = F.one_hot(soft.argmax(1), k).permute(0, 3, 1, 2).float()
        soft = hard - soft.detach() + soft
    recon = model.recon_loss(model.decode(soft), target)
    log_q = F.log_softmax(logits, dim=1)
    kl = (log_q.exp() * (log_q + math.log(k))).sum(1).mean()
    return recon + kl_weight * kl


class ManifestViews(torch.utils.data.IterableDataset):
    """Random-resized views of the train split's image files of an imglish manifest (Pillow + torchvision)."""

    def __init__(self, manifest, size):
        import os

        import pyarrow.parquet as pq

        base = json.load(open(os.path.join(manifest, "ingest.json"))).get("base_dir") or ""
        rows = pq.read_table(os.path.join(manifest, "samples.parquet"), columns=["kind", "path", "split"]).to_pylist()
        self.paths = [os.path.join(base, r["path"]) for r in rows if r["split"] == "train" and r["kind"] == "file"]
        self.size = size

    def __iter__(self):
        from PIL import Image
        from torchvision import transforms

        t = transforms.Compose([
            transforms.RandomResizedCrop(self.size, scale=(0.6, 1.0),
                                         interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ])
        g = torch.Generator().manual_seed(0)
        while True:
            for i in torch.randperm(len(self.paths), generator=g).tolist():
                with Image.open(self.paths[i]) as im:
                    yield t(im.convert("RGB"))


def bench(config_path, steps, threads, manifest=None):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = json.load(open(config_path))
    model = Dvae(cfg["model"])
    o = cfg["optim"]
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]  # the VQ codebook is a buffer
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o["lr"],
        betas=tuple(o["betas"]),
        eps=o["eps"],
    )
    b, s = cfg["batch_size"], cfg["model"]["input_size"]
    x = torch.rand(b, 3, s, s) * 2 - 1
    target = (x + 1) / 2
    batches = None
    if manifest is not None:
        loader = torch.utils.data.DataLoader(ManifestViews(manifest, s), batch_size=b, num_workers=1)
        batches = iter(loader)
    t0, t1 = cfg["temperature"]
    span = max(cfg["steps"] * cfg["anneal_fraction"], 1.0)
    start = time.perf_counter()
    for step in range(steps):
        tau = t0 * (t1 / t0) ** min(step / span, 1.0)
        if batches is not None:
            target = next(batches)
            x = target * 2 - 1
        if model.vq:
            loss = vq_step_loss(model, x, target, cfg["ema_decay"], cfg["commitment"])
        else:
            loss = step_loss(model, x, target, tau, cfg["kl_weight"], cfg["straight_through"])
        opt.zero_grad()
        loss.backward()
        if o["clip_grad"] is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_grad"])
        opt.step()
        loss.item()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "steps": steps, "batch": b, "threads": threads,
                      "data": "manifest" if manifest else "pre-made tensors"}))


if __name__ == "__main__":
    if sys.argv[1] == "bench":
        bench(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
    else:
        sys.exit(__doc__)
