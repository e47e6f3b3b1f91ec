"""``python -m imglish.pretrain``: data-parallel BEiT-3 (torchscale ``BEiT3``) and BEiT (timm ``Beit``) pretraining
on torch.distributed, launched by torchrun.

    torchrun --nproc_per_node 2 -m imglish.pretrain --dataset DATASET --out RUN --steps 1000 --batch-size 64

The same options as ``imglish train`` give the same configuration (computed by imglish's Rust core), the same
batches (views, masks, kinds and captions of the Rust trainer, read by :class:`imglish.StreamingDataset`), and
the same checkpoint layout (``RUN/checkpoints/step-N/{model,optimizer}.safetensors`` + ``state.json``), so that
``imglish probe`` reads its checkpoints and ``imglish train --resume`` and ``python -m imglish.pretrain --resume``
continue each other's runs. ``--batch-size`` is the global micro-batch (all ranks together); each rank takes
``batch-size / world-size`` samples of it, so a run's numbers do not depend on the world size, and a resume may
use another one.

Gradients are those of the global batch: each rank's summed cross-entropies are divided by the global count of
predicted tokens (all ranks, all micro-batches of the step) and DDP averages across ranks.
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from . import _native
from .data import Dataset, StreamingDataset, batch_to_torch, train_config
from .models import BeitPretrain, Beit3Pretrain, decays, imglish_name

CHECKPOINT_VERSION = 1
TASKS = ("image_mim", "pair_mim", "text_mlm", "pair_mlm", "mim")


def _add_counts(a, b):
    """The sum of two bincounts of different lengths."""
    n = max(len(a), len(b))
    return torch.nn.functional.pad(a, (0, n - len(a))) + torch.nn.functional.pad(b, (0, n - len(b)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m imglish.pretrain",
        description="Data-parallel BEiT-3 / BEiT pretraining on an imglish dataset (launch with torchrun).",
    )
    p.add_argument("--dataset", required=True, help="a packed dataset (imglish pack)")
    p.add_argument("--out", required=True, help="the run folder (checkpoints, metrics.jsonl)")
    p.add_argument("--model", default="beit3", choices=["beit3", "beit"], help="BEiT-3 (torchscale) or BEiT v1 (timm)")
    p.add_argument("--rel-pos", choices=["shared", "per-layer", "off"], help="BEiT: relative position bias")
    p.add_argument("--abs-pos", action="store_true", help="BEiT: absolute position embeddings")
    p.add_argument("--mask", default="blockwise", choices=["blockwise", "random"], help="BEiT: mask shape")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dim", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--drop-path", type=float)
    p.add_argument("--input", default="tokens", choices=["tokens", "pixels"])
    p.add_argument("--mix", default="image=1,text=1,pair=1")
    p.add_argument("--text-mask-ratio", type=float, default=0.15)
    p.add_argument("--pair-text-mask-ratio", type=float, default=0.5)
    p.add_argument("--tie-mlm-head", action="store_true")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64, help="global micro-batch (all ranks together)")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, default=3.0)
    p.add_argument("--mask-ratio", type=float)
    p.add_argument("--min-mask-block", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle", default="window", choices=["window", "global", "none"])
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--checkpoint-every", type=int, default=0, help="0: only at the end")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="validation every N steps (0: at the start and the end)")
    p.add_argument("--eval-samples", type=int, default=2048, help="validation samples (the first ones in dataset order)")
    p.add_argument("--stop-at", type=int, help="stop after this step (with a checkpoint)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--device", default="cpu", help="cpu, cuda (each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--precision", default="f32", choices=["f32", "bf16"], help="bf16: autocast on CUDA")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="FSDP2 instead of DDP: parameters, gradients and AdamW state sharded over the ranks between steps",
    )
    p.add_argument("--threads", type=int, help="intra-op threads per rank")
    p.add_argument(
        "--audit",
        action="store_true",
        help="write audit-w{WORLD}-rank{R}.jsonl: the (epoch, position, sample id) each rank read per step, and a sha256 of "
        "its weights at the end",
    )
    return p.parse_args(argv)


def parse_mix(text):
    mix = [0.0, 0.0, 0.0]
    for part in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = part.partition("=")
        slots = {"image": 0, "text": 1, "pair": 2}
        if name.strip() not in slots or not value:
            raise SystemExit(f"error: --mix '{part}' is not KIND=WEIGHT with KIND image, text or pair")
        mix[slots[name.strip()]] = float(value)
    return mix


def options_of(args):
    """``imglish train``'s options (imglish_train::TrainOptions) for these arguments."""
    opts = {
        "model": args.model,
        "preset": args.preset,
        "input": args.input,
        "mix": parse_mix(args.mix),
        "text_mask_ratio": args.text_mask_ratio,
        "pair_text_mask_ratio": args.pair_text_mask_ratio,
        "tie_mlm_head": args.tie_mlm_head,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "accum": args.accum,
        "lr": args.lr,
        "min_lr": args.min_lr,
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "clip_grad": args.clip_grad,
        "seed": args.seed,
        "abs_pos": args.abs_pos,
        "mask": args.mask,
        "shuffle": {"window": {"kind": "window", "batches": 16}, "global": {"kind": "global"}, "none": {"kind": "none"}}[
            args.shuffle
        ],
    }
    for key in ("dim", "depth", "heads", "drop_path", "mask_ratio", "min_mask_block"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    if args.rel_pos is not None:
        opts["rel_pos"] = args.rel_pos.replace("-", "_")
    return opts


def lr_at(optim, step, total):
    """imglish's schedule: linear warmup, then cosine to min_lr (OptimConfig::lr_at)."""
    warm = optim["warmup_steps"]
    if step < warm:
        return optim["lr"] * (step + 1) / warm
    span = max(total - warm, 1)
    t = min((step - warm) / span, 1.0)
    return optim["min_lr"] + 0.5 * (optim["lr"] - optim["min_lr"]) * (1 + math.cos(math.pi * t))


class Dist:
    """Rank, world size and device; torch.distributed when launched with a world size above 1."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise SystemExit("error: --device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.on = self.world > 1
        if self.on:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def all_sum(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.on:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.on:
            dist.barrier()

    def close(self):
        if self.on:
            dist.destroy_process_group()


def lock_dir(path):
    """Rank 0 holds an advisory lock (``flock``) on the run folder while it writes it, as ``imglish train`` does
    (the two refuse each other): the OS drops it when the process ends, even by kill -9. Returns the open folder
    (keep it); raises SystemExit naming the holder when another process writes the folder."""
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise SystemExit(f"error: cannot create {path}: {e.strerror} (os error {e.errno})")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = lock_holder(os.fstat(fd).st_ino)
        os.close(fd)
        who = f"another imglish process (pid {pid})" if pid else "another imglish process"
        raise SystemExit(f"error: {who} is writing {path}; wait for it to finish or stop it")
    return fd


def lock_holder(inode):
    """The pid holding a flock on ``inode``, from /proc/locks (Linux; None elsewhere)."""
    try:
        with open("/proc/locks") as f:
            for line in f:
                p = line.split()
                if len(p) > 5 and p[1] == "FLOCK" and p[5].rsplit(":", 1)[-1] == str(inode):
                    return int(p[4])
    except (OSError, ValueError):
        pass
    return None


def latest_checkpoint(out):
    root = os.path.join(out, "checkpoints")
    best = None
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith("step-") and os.path.exists(os.path.join(root, name, "state.json")):
                step = int(name[5:])
                if best is None or step > best[0]:
                    best = (step, os.path.join(root, name))
    return best[1] if best else None


def diff(a, b, prefix=""):
    """The paths where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {json.dumps(a)} vs {json.dumps(b)}"]


def fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_checkpoint(out, tensors, moments, state, keep):
    """Rank 0: temporary folder, fsync, rename, then keep the newest ``keep`` (as imglish train)."""
    root = os.path.join(out, "checkpoints")
    name = f"step-{state['step']:08}"
    tmp, dst = os.path.join(root, f".tmp-{name}"), os.path.join(root, name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"))
    save_file(moments, os.path.join(tmp, "optimizer.safetensors"))
    files = {f: file_sha256(os.path.join(tmp, f)) for f in ("model.safetensors", "optimizer.safetensors")}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(dict(state, files=files), f, indent=2)
    for f in ("model.safetensors", "optimizer.safetensors", "state.json"):
        fsync_file(os.path.join(tmp, f))
    shutil.rmtree(dst, ignore_errors=True)
    os.rename(tmp, dst)
    fd = os.open(root, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    steps = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step-"))
    for s in steps[: max(len(steps) - max(keep, 1), 0)]:
        shutil.rmtree(os.path.join(root, f"step-{s:08}"), ignore_errors=True)
    return dst


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def restore(ckpt, config, fingerprint, params, architecture):
    """Loads a checkpoint written by either trainer; refuses other settings (naming them), another dataset, or a
    weight file whose sha256 is not the one state.json records."""
    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    for name, want in state.get("files", {}).items():
        if os.path.basename(name) != name or not os.path.isfile(os.path.join(ckpt, name)):
            raise SystemExit(f"error: checkpoint {ckpt}: state.json lists {name!r}, which is not a file beside it")
        got = file_sha256(os.path.join(ckpt, name))
        if got != want:
            raise SystemExit(f"error: checkpoint {ckpt}: {name}: sha256 is {got}, state.json says {want}: the file was "
                             "damaged or replaced after the checkpoint was written")
    arch = state.get("architecture", "beit")
    if arch != architecture:
        raise SystemExit(f"error: checkpoint {ckpt}: a {arch} checkpoint, this run trains {architecture}")
    if state["config"] != config:
        raise SystemExit(
            f"error: checkpoint {ckpt}: written by a run with other settings: {'; '.join(diff(state['config'], config))}"
        )
    if state["dataset_fingerprint"] != fingerprint:
        raise SystemExit(f"error: checkpoint {ckpt}: written for another dataset (build fingerprints differ)")
    params.load(load_file(os.path.join(ckpt, "model.safetensors")), load_file(os.path.join(ckpt, "optimizer.safetensors")))
    return state


class Params:
    """The model's weights and AdamW moments under imglish's names, whole on every rank (with ``--fsdp``
    gathered from the shards: every rank must call these together)."""

    def __init__(self, model, optimizer, fsdp):
        self.model, self.opt, self.fsdp = model, optimizer, fsdp
        self.names = {n: imglish_name(n) for n, _ in model.named_parameters()}
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def tensors(self):
        if not self.fsdp:
            return self.model.imglish_state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return {self.names[k]: v.detach().float().contiguous().cpu() for k, v in sd.items() if k in self.names}

    def moments(self):
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            by_name = get_optimizer_state_dict(
                self.model, self.opt, options=StateDictOptions(full_state_dict=True)
            )["state"]
        else:
            by_name = {n: self.opt.state.get(p, {}) for n, p in self.model.named_parameters()}
        out, step = {}, 0
        for fqn, key in self.names.items():
            s = by_name.get(fqn, {})
            for m in ("exp_avg", "exp_avg_sq"):
                t = s.get(m)
                out[f"{m}.{key}"] = (
                    t.detach().float().contiguous().cpu() if t is not None else torch.zeros(self.shapes[fqn])
                )
            if "step" in s:
                step = int(s["step"])
        out["step"] = torch.tensor([step], dtype=torch.int64)
        return out

    def load(self, tensors, moments):
        """Weights and moments from a checkpoint; a missing, extra or misshaped tensor is an error naming it."""
        want = {key: fqn for fqn, key in self.names.items()}
        extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
        if extra or missing:
            raise SystemExit(f"error: checkpoint tensors do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, fqn in want.items():
            if tuple(tensors[key].shape) != self.shapes[fqn]:
                raise SystemExit(f"error: tensor '{key}' has shape {tuple(tensors[key].shape)}, the model's is {self.shapes[fqn]}")
        step = int(moments["step"][0])
        state = {
            fqn: {
                "step": torch.tensor(float(step)),
                "exp_avg": moments[f"exp_avg.{key}"],
                "exp_avg_sq": moments[f"exp_avg_sq.{key}"],
            }
            for key, fqn in want.items()
        }
        if not self.fsdp:
            self.model.load_imglish_state_dict(tensors)
            if step > 0:
                params = dict(self.model.named_parameters())
                for fqn, s in state.items():
                    p = params[fqn]
                    self.opt.state[p] = {k: (v.to(p.device).clone() if k != "step" else v) for k, v in s.items()}
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, {fqn: tensors[key] for key, fqn in want.items()}, options=options)
        if step > 0:
            osd = get_optimizer_state_dict(self.model, self.opt, options=options)
            osd["state"] = state
            set_optimizer_state_dict(self.model, self.opt, osd, options=options)


def make_optimizer(model, optim):
    names = model.imglish_names()
    decay = [p for p, n in names.items() if decays(n, p.dim())]
    plain = [p for p, n in names.items() if not decays(n, p.dim())]
    groups = [
        {"params": decay, "weight_decay": optim["weight_decay"]},
        {"params": plain, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"], foreach=False)
    return opt, names


def shard(model, d):
    """FSDP2 (``fully_shard``) with one unit, the whole model: parameters, gradients and AdamW state are sharded
    over the ranks between steps, and the parameters are gathered whole for each micro-batch's forward and
    backward. (Units per Transformer layer gave gradients different from DDP's: BEiT-3 runs the encoder up to
    three times per micro-batch, once per sample kind.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh(d.device.type, (d.world,)))


def drop_unused_grads(model, d):
    """FSDP leaves a zero gradient on parameters no rank used this step (a kind absent from the whole global
    batch); DDP and imglish train leave none, so AdamW does not touch them. Same here: a gradient that is zero on
    every rank is dropped."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return
    local = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in params)]
    sums = torch.stack([g.abs().sum().double() if g.numel() else torch.zeros((), dtype=torch.float64) for g in local])
    if d.on:
        dist.all_reduce(sums)
    for p, total in zip(params, sums.tolist()):
        if total == 0.0:
            p.grad = None


def counts(batch):
    """(MIM targets, MLM targets) of one micro-batch."""
    if "mask" in batch:  # BEiT
        return int(batch["mask"].sum()), 0
    mim = sum(int(batch[f"{k}.mask"].sum()) for k in ("image", "pair") if f"{k}.mask" in batch)
    mlm = sum(int(batch[f"{k}.predict"].sum()) for k in ("text", "pair") if f"{k}.predict" in batch)
    return mim, mlm


def main(argv=None):
    args = parse_args(argv)
    # The expanded CLS / mask tokens give gradients with other strides than DDP's buckets: harmless.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if args.threads:
        torch.set_num_threads(args.threads)
    d = Dist(args.device)
    lock = None
    try:
        lock = lock_dir(args.out) if d.rank == 0 else None
        return run(args, d)
    finally:
        if lock is not None:
            os.close(lock)
        d.close()


def run(args, d):
    if args.batch_size % d.world:
        raise SystemExit(
            f"error: --batch-size {args.batch_size} (the global micro-batch) is not a multiple of the world size {d.world}"
        )
    dataset = Dataset(args.dataset)
    config = train_config(args.dataset, **options_of(args))
    fingerprint = dataset.index["build_fingerprint"]
    torch.manual_seed(config["seed"])
    model = (Beit3Pretrain if args.model == "beit3" else BeitPretrain)(config["model"]).to(d.device)
    if args.fsdp:
        shard(model, d)
    optimizer, _ = make_optimizer(model, config["optim"])
    params = Params(model, optimizer, args.fsdp)
    ckpt = latest_checkpoint(args.out)
    step, stream, samples = 0, {"epoch": 0, "position": 0}, 0
    if ckpt and not args.resume:
        raise SystemExit(
            f"error: {args.out} already holds checkpoints: pass --resume to continue that run, or choose another --out"
        )
    if ckpt:
        state = restore(ckpt, config, fingerprint, params, args.model)
        step, stream, samples = state["step"], state["stream"], state["samples"]
    if d.rank == 0:
        os.makedirs(os.path.join(args.out, "checkpoints"), exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        truncate_metrics(os.path.join(args.out, "metrics.jsonl"), step)
    d.barrier()
    net = DDP(model, find_unused_parameters=True) if d.on and not args.fsdp else model

    data = StreamingDataset(args.dataset, args.batch_size // d.world, config=config, endless=True)
    data.load_state_dict(stream)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        num_workers=args.workers,
        persistent_workers=False,
        prefetch_factor=4 if args.workers else None,
    )
    until = min(config["steps"], args.stop_at if args.stop_at is not None else config["steps"])
    if d.rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"pretrain: {'BEiT-3' if args.model == 'beit3' else 'BEiT'} ({n_params / 1e6:.2f}M parameters) on {d.world} x {d.device.type}, steps {step}..{until}, "
            f"global batch {args.batch_size} x {config['accum']}",
            file=sys.stderr,
        )
    audit_path = os.path.join(args.out, f"audit-w{d.world}-rank{d.rank}.jsonl")
    samples_log = open(audit_path, "a") if args.audit else None
    val = data._get_reader().validation(config["stream"]["batch_size"], args.eval_samples)
    if step == 0:
        report_val(args, d, model, val, step)
    it = iter(loader)
    window = Window()
    last_ckpt = None
    accum = config["accum"]
    while step < until:
        micro = [batch_to_torch(next(it), d.device) for _ in range(accum)]
        mim_total, mlm_total = d.all_sum([sum(c) for c in zip(*(counts(b) for b in micro))] if micro else [0, 0])
        lr = lr_at(config["optim"], step, config["steps"])
        for g in optimizer.param_groups:
            g["lr"] = lr
        # Stochastic depth draws from a generator keyed by (seed, step, rank): a resumed run draws the same.
        torch.manual_seed((config["seed"] * 1_000_003 + step) * 4099 + d.rank)
        sums = torch.zeros(2, dtype=torch.float64)
        for i, b in enumerate(micro):
            sync = i == accum - 1 or not d.on
            if args.fsdp:
                model.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or args.fsdp else net.no_sync():
                with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                    mim, mlm, tally = net(b)
                loss = (mim / max(mim_total, 1.0) + mlm / max(mlm_total, 1.0)) * d.world
                loss.backward()
            sums += torch.tensor([float(mim.detach()), float(mlm.detach())], dtype=torch.float64)
            window.add(tally, b)
            if samples_log is not None:
                samples_log.write(json.dumps({"step": step + 1, "micro": i, "samples": b["__samples__"]}) + "\n")
        if args.fsdp:
            drop_unused_grads(model, d)
        clip = config["optim"].get("clip_grad")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        samples += args.batch_size * accum
        stream = micro[-1]["__state__"]
        mim_sum, mlm_sum = d.all_sum(sums.tolist())
        loss = mim_sum / max(mim_total, 1.0) + mlm_sum / max(mlm_total, 1.0)
        if not math.isfinite(loss):
            raise SystemExit(f"error: step {step}: the loss is {loss} (lower the learning rate or enable clipping)")
        window.loss(loss, stream, lr, grad_norm)
        if step % args.log_every == 0 or step == until:
            record = window.metrics(d, step, args.batch_size * accum)
            if d.rank == 0:
                append_json(os.path.join(args.out, "metrics.jsonl"), record)
                print(line(record), file=sys.stderr, flush=True)
            window = Window()
        if (args.eval_every and step % args.eval_every == 0) or step == until:
            report_val(args, d, model, val, step)
        if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == until:
            if samples_log is not None:
                samples_log.flush()
                os.fsync(samples_log.fileno())
            tensors, moments = params.tensors(), params.moments()
            if d.rank == 0:
                state = {
                    "format_version": CHECKPOINT_VERSION,
                    "imglish_version": _native.__version__,
                    "architecture": args.model,
                    "step": step,
                    "stream": stream,
                    "samples": samples,
                    "dataset_fingerprint": fingerprint,
                    "tokenizer_fingerprint": dataset.index["tokenizer"]["fingerprint"],
                    "config": config,
                }
                last_ckpt = write_checkpoint(args.out, tensors, moments, state, args.keep_checkpoints)
                print(f"checkpoint {last_ckpt}", file=sys.stderr, flush=True)
            d.barrier()
    if samples_log is not None:
        digest = hashlib.sha256()
        for key, t in sorted(params.tensors().items()):
            digest.update(key.encode())
            digest.update(t.numpy().tobytes())
        samples_log.write(json.dumps({"step": step, "weights_sha256": digest.hexdigest()}) + "\n")
        samples_log.close()
    if d.rank == 0:
        print(f"pretrain: {step} steps, {samples} samples; checkpoint {last_ckpt}", file=sys.stderr)
    return 0


def report_val(args, d, model, val, step):
    """Validation on the fixed set `imglish train` uses (same samples, masks, kinds and captions); every rank
    computes it (FSDP's gathers need them all), rank 0 writes it. Same record as imglish train's."""
    if not val:
        return
    from .data import _arrays

    sums = {}
    kinds = {}
    codes = None  # BEiT: counts of the masked target codes, for the majority-code baseline
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for raw in val:
            b = batch_to_torch(_arrays(raw), d.device)
            _, _, tally = model(b)
            for task, (loss, correct, count) in tally.items():
                acc = sums.setdefault(task, [0.0, 0.0, 0])
                acc[0] += float(loss)
                acc[1] += float(correct)
                acc[2] += count
            for k in ("image", "text", "pair"):
                if f"{k}.ids" in b:
                    kinds[k] = kinds.get(k, 0) + len(b[f"{k}.ids"])
            if "sample_ids" in b:
                kinds["image"] = kinds.get("image", 0) + len(b["sample_ids"])
            if "tokens" in b and "mask" in b:
                c = torch.bincount(b["tokens"][b["mask"].bool()].flatten().long().cpu())
                codes = c if codes is None else _add_counts(codes, c)
    model.train(was_training)
    if "mim" in sums:
        loss, correct, count = sums["mim"]
        majority = float(codes.max()) / max(int(codes.sum()), 1) if codes is not None and codes.numel() else 0.0
        record = {"kind": "val", "step": step, "loss": loss / count, "accuracy": correct / count,
                  "majority_accuracy": majority, "samples": kinds.get("image", 0)}
        text = (f"step {step:>6}  val loss {record['loss']:.4f}  val acc {record['accuracy']:.3f} (always the most "
                f"frequent code: {majority:.3f})  ({record['samples']} samples)")
    else:
        def mean(a, b):
            n = sums.get(a, [0, 0, 0])[2] + sums.get(b, [0, 0, 0])[2]
            return (sums.get(a, [0, 0, 0])[0] + sums.get(b, [0, 0, 0])[0]) / n if n else 0.0

        tasks = {t: {"loss": v[0] / v[2], "accuracy": v[1] / v[2], "tokens": v[2]} for t, v in sums.items() if v[2]}
        record = {
            "kind": "val",
            "step": step,
            "epoch": 0,
            "loss": mean("image_mim", "pair_mim") + mean("text_mlm", "pair_mlm"),
            "tasks": tasks,
            "samples": kinds,
            "lr": 0.0,
            "grad_norm": 0.0,
            "samples_per_s": 0.0,
            "data_wait": 0.0,
        }
        parts = "  ".join(f"{n} {t['loss']:.3f}/{t['accuracy']:.3f}" for n, t in tasks.items())
        text = f"step {step:>6}  val loss {record['loss']:.4f}  [{parts}] (loss/acc)"
    if d.rank == 0:
        append_json(os.path.join(args.out, "metrics.jsonl"), record)
        print(text, file=sys.stderr, flush=True)


class Window:
    """Task sums between two log lines (summed over ranks when reported)."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.tasks = {t: [0.0, 0.0, 0.0] for t in TASKS}
        self.kinds = [0.0, 0.0, 0.0]
        self.steps = 0
        self.last = None

    def add(self, tally, batch):
        for task, (loss, correct, count) in tally.items():
            acc = self.tasks[task]
            acc[0] += float(loss)
            acc[1] += float(correct)
            acc[2] += float(count)
        for i, k in enumerate(("image", "text", "pair")):
            if f"{k}.ids" in batch:
                self.kinds[i] += len(batch[f"{k}.ids"])
        if "sample_ids" in batch:
            self.kinds[0] += len(batch["sample_ids"])

    def loss(self, loss, stream, lr, grad_norm):
        self.steps += 1
        self.last = (loss, stream, lr, grad_norm)

    def metrics(self, d, step, samples_per_step):
        flat = [v for t in TASKS for v in self.tasks[t]] + self.kinds
        total = d.all_sum(flat)
        tasks = {}
        for i, t in enumerate(TASKS):
            loss, correct, count = total[3 * i : 3 * i + 3]
            if count > 0:
                tasks[t] = {"loss": loss / count, "accuracy": correct / count, "tokens": int(count)}
        kinds = {k: int(n) for k, n in zip(("image", "text", "pair"), total[3 * len(TASKS) :]) if n > 0}
        _, stream, lr, grad_norm = self.last

        def mean(a, b):
            n = total[3 * a + 2] + total[3 * b + 2]
            return (total[3 * a] + total[3 * b]) / n if n > 0 else 0.0

        secs = max(time.monotonic() - self.t0, 1e-9)
        if "mim" in tasks:  # BEiT: imglish train's StepMetrics
            return {
                "kind": "train",
                "step": step,
                "epoch": stream["epoch"],
                "loss": tasks["mim"]["loss"],
                "accuracy": tasks["mim"]["accuracy"],
                "lr": lr,
                "grad_norm": grad_norm,
                "samples_per_s": self.steps * samples_per_step / secs,
                "data_wait": 0.0,
            }
        # As imglish train: mean MIM + mean MLM cross-entropy over the window.
        loss = mean(0, 1) + mean(2, 3)
        return {
            "kind": "train",
            "step": step,
            "epoch": stream["epoch"],
            "loss": loss,
            "tasks": tasks,
            "samples": kinds,
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": self.steps * samples_per_step / secs,
            "data_wait": 0.0,
        }


def line(m):
    if "accuracy" in m:
        return (
            f"step {m['step']:>6}  epoch {m['epoch']}  loss {m['loss']:.4f}  acc {m['accuracy']:.3f}  lr {m['lr']:.2e}  "
            f"|g| {m['grad_norm']:.2f}  {m['samples_per_s']:.1f} samples/s"
        )
    tasks = "  ".join(f"{n} {t['loss']:.3f}/{t['accuracy']:.3f}" for n, t in m["tasks"].items())
    return (
        f"step {m['step']:>6}  epoch {m['epoch']}  loss {m['loss']:.4f}  [{tasks}]  lr {m['lr']:.2e}  "
        f"|g| {m['grad_norm']:.2f}  {m['samples_per_s']:.1f} samples/s"
    )


def append_json(path, value):
    with open(path, "a") as f:
        f.write(json.dumps(value) + "\n")


def truncate_metrics(path, step):
    """Drops metric lines after ``step`` (a resumed run rewrites them), as imglish train does."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line_ in f:
            try:
                if json.loads(line_).get("step", 0) <= step:
                    keep.append(line_)
            except json.JSONDecodeError:
                pass
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
