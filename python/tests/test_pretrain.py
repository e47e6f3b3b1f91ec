"""python -m imglish.pretrain under torchrun (gloo on the CPU): ranks stay bitwise equal, the loss equals a
1-rank run of the same global batch, every sample is read exactly once per epoch (also across a kill -9 and a
resume with another world size), and checkpoints go both ways between it and the Rust trainer."""

import fcntl
import glob
import json
import os
import subprocess
import time
import unittest

import imglish
from common import PYTHON, dataset, imglish_bin, kill_tree, run, tmpdir

MODEL = ["--dim", "32", "--depth", "2", "--heads", "2", "--drop-path", "0"]


def pretrain(out, *args, nproc=1, workers=2, timeout=300):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "imglish.pretrain", "--dataset", dataset(), "--out", out, "--threads", "1"]
    cmd += ["--workers", str(workers), "--log-every", "1", *MODEL, *args]
    return run(cmd, timeout=timeout)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"train"' in line]


def audit(out, world):
    """Per rank: list of records (per step and micro-batch), and the final weights hash."""
    ranks = []
    for path in sorted(glob.glob(os.path.join(out, f"audit-w{world}-rank*.jsonl"))):
        with open(path) as f:
            recs = [json.loads(line) for line in f]
        ranks.append(recs)
    return ranks


def positions(records, epoch, steps=None):
    out = []
    for r in records:
        if "samples" in r and (steps is None or r["step"] in steps):
            out += [p for e, p, _ in r["samples"] if e == epoch]
    return out


class PretrainTest(unittest.TestCase):
    def test_two_ranks_equal_one_rank_and_stay_in_sync(self):
        d = tmpdir(self)
        two, one = os.path.join(d, "two"), os.path.join(d, "one")
        r = pretrain(two, "--steps", "12", "--batch-size", "8", "--audit", nproc=2, workers=2)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = pretrain(one, "--steps", "12", "--batch-size", "8", nproc=1, workers=0)
        self.assertEqual(r.returncode, 0, r.stderr)
        a, b = metrics(two), metrics(one)
        self.assertEqual([m["step"] for m in a], list(range(1, 13)))
        for x, y in zip(a, b):
            self.assertLess(abs(x["loss"] - y["loss"]), 1e-4 * abs(y["loss"]), (x, y))
            for task in y["tasks"]:
                self.assertLess(abs(x["tasks"][task]["loss"] - y["tasks"][task]["loss"]), 1e-4 * y["tasks"][task]["loss"])
        ranks = audit(two, 2)
        self.assertEqual(len(ranks), 2)
        hashes = {recs[-1]["weights_sha256"] for recs in ranks}
        self.assertEqual(len(hashes), 1, "the ranks' weights differ")
        # 12 steps of 8 cover epoch 0 (76 train samples): each position read exactly once by the 2 x 2 readers.
        n = imglish.Dataset(dataset()).counts["train"]
        seen = positions(ranks[0], 0) + positions(ranks[1], 0)
        self.assertEqual(sorted(seen), list(range(n)))

    def test_kill_and_resume_with_three_ranks_reads_the_rest_exactly_once(self):
        out = os.path.join(tmpdir(self), "run")
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += ["-m", "imglish.pretrain", "--dataset", dataset(), "--out", out, "--threads", "1", "--workers", "2"]
        cmd += [*MODEL, "--steps", "500", "--batch-size", "12", "--checkpoint-every", "2", "--audit"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not glob.glob(os.path.join(out, "checkpoints", "step-*")):
                self.assertIsNone(proc.poll(), "the run ended before its first checkpoint")
                self.assertLess(time.monotonic(), deadline, "no checkpoint after 240 s")
                time.sleep(0.05)
        finally:
            kill_tree(proc.pid)
            proc.wait()
        ckpts = sorted(c for c in os.listdir(os.path.join(out, "checkpoints")) if c.startswith("step-"))
        with open(os.path.join(out, "checkpoints", ckpts[-1], "state.json")) as f:
            state = json.load(f)
        done, epoch = state["step"], state["stream"]["epoch"]
        n = imglish.Dataset(dataset()).counts["train"]
        steps_per_epoch = -(-n // 12)
        r = pretrain(out, "--steps", "500", "--batch-size", "12", "--checkpoint-every", "2", "--audit", "--resume",
                     "--stop-at", str(done + steps_per_epoch + 1), nproc=3, workers=1)
        self.assertEqual(r.returncode, 0, r.stderr)
        # The epoch the checkpoint is in: what the 2 ranks read up to the checkpoint, plus what the 3 ranks read.
        before = [p for recs in audit(out, 2) for p in positions(recs, epoch, range(1, done + 1))]
        after = [p for recs in audit(out, 3) for p in positions(recs, epoch)]
        self.assertTrue(after, f"{state} {r.stderr[-1500:]}")
        self.assertEqual(sorted(before + after), list(range(n)), f"resumed after step {done}")
        self.assertEqual(len(set(h[-1]["weights_sha256"] for h in audit(out, 3))), 1)

    def test_checkpoints_go_both_ways_with_the_rust_trainer(self):
        d = tmpdir(self)
        py, rs = os.path.join(d, "py"), os.path.join(d, "rs")
        common = ["--steps", "10", "--batch-size", "8", "--seed", "5"]
        # Python for 6 steps, then both trainers continue the same checkpoint to step 10.
        r = pretrain(py, *common, "--stop-at", "6", nproc=2)
        self.assertEqual(r.returncode, 0, r.stderr)
        probe = run([imglish_bin(), "probe", "--task", "retrieval", "--checkpoint", py, "--dataset", dataset()])
        self.assertEqual(probe.returncode, 0, probe.stderr)
        self.assertTrue(probe.stdout.startswith("retrieval probe: image->text R@1 "), probe.stdout)
        os.makedirs(rs)
        subprocess.run(["cp", "-r", os.path.join(py, "checkpoints"), rs], check=True)
        train = [imglish_bin(), "train", "--model", "beit3", "--dataset", dataset(), "--log-every", "2", *MODEL]
        r = run(train + ["--out", rs, *common, "--resume"])
        self.assertEqual(r.returncode, 0, r.stderr)
        r = pretrain(py, *common, "--resume", nproc=1, workers=0)
        self.assertEqual(r.returncode, 0, r.stderr)
        rust = {m["step"]: m for m in metrics(rs)}
        python = {m["step"]: m for m in metrics(py)}
        # Same weights, data, masks and optimiser: the Rust trainer's window (steps 9-10) and Python's steps 9, 10.
        for task, t in rust[10]["tasks"].items():
            none = {"loss": 0.0, "tokens": 0}
            p9, p10 = python[9]["tasks"].get(task, none), python[10]["tasks"].get(task, none)
            mean = (p9["loss"] * p9["tokens"] + p10["loss"] * p10["tokens"]) / (p9["tokens"] + p10["tokens"])
            self.assertEqual(t["tokens"], p9["tokens"] + p10["tokens"], task)
            self.assertLess(abs(t["loss"] - mean), 1e-4 * mean, (task, t, mean))
        # Both evaluate the same validation set at the end: the same losses within 1e-4.
        val_rs = [json.loads(l) for l in open(os.path.join(rs, "metrics.jsonl")) if '"val"' in l][-1]
        val_py = [json.loads(l) for l in open(os.path.join(py, "metrics.jsonl")) if '"val"' in l][-1]
        self.assertEqual((val_rs["step"], val_py["step"]), (10, 10))
        self.assertEqual(val_rs["samples"], val_py["samples"])
        for task, t in val_rs["tasks"].items():
            self.assertLess(abs(t["loss"] - val_py["tasks"][task]["loss"]), 1e-4 * t["loss"], task)
            self.assertEqual(t["tokens"], val_py["tasks"][task]["tokens"], task)
        # And the reverse: Python continues a Rust checkpoint.
        rs2 = os.path.join(d, "rs2")
        r = run(train + ["--out", rs2, *common, "--stop-at", "4"])
        self.assertEqual(r.returncode, 0, r.stderr)
        r = pretrain(rs2, *common, "--resume", nproc=2)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(metrics(rs2)[-1]["step"], 10)
        self.assertTrue(os.path.exists(os.path.join(rs2, "checkpoints", "step-00000010", "model.safetensors")))

    def test_beit_on_timm_continues_like_imglish_train(self):
        """BEiT v1 on timm's Beit: a 2-rank checkpoint resumed by both trainers gives the same losses."""
        d = tmpdir(self)
        py, rs = os.path.join(d, "py"), os.path.join(d, "rs")
        common = ["--model", "beit", "--steps", "10", "--batch-size", "8"]
        r = pretrain(py, *common, "--stop-at", "6", nproc=2)
        self.assertEqual(r.returncode, 0, r.stderr)
        probe = run([imglish_bin(), "probe", "--checkpoint", py, "--dataset", dataset()])
        self.assertEqual(probe.returncode, 0, probe.stderr)
        self.assertTrue(probe.stdout.startswith("probe: val accuracy "), probe.stdout)
        os.makedirs(rs)
        subprocess.run(["cp", "-r", os.path.join(py, "checkpoints"), rs], check=True)
        r = run([imglish_bin(), "train", "--dataset", dataset(), "--out", rs, "--log-every", "2", *MODEL, *common[2:], "--resume"])
        self.assertEqual(r.returncode, 0, r.stderr)
        r = pretrain(py, *common, "--resume", "--log-every", "2", nproc=1, workers=0)
        self.assertEqual(r.returncode, 0, r.stderr)
        rust, python = metrics(rs)[-1], metrics(py)[-1]
        self.assertEqual((rust["step"], python["step"]), (10, 10))
        self.assertLess(abs(rust["loss"] - python["loss"]), 1e-4 * rust["loss"], (rust, python))
        self.assertEqual(rust["accuracy"], python["accuracy"])
        # The validation records carry the same majority-code baseline.
        val = lambda run_dir: [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if '"val"' in l][-1]  # noqa: E731
        self.assertGreater(val(rs)["majority_accuracy"], 0.0)
        self.assertAlmostEqual(val(rs)["majority_accuracy"], val(py)["majority_accuracy"], places=9)

    def test_fsdp_matches_ddp_and_resumes_exactly(self):
        d = tmpdir(self)
        ddp, fsdp, resumed = (os.path.join(d, n) for n in ("ddp", "fsdp", "resumed"))
        common = ["--steps", "8", "--batch-size", "8"]
        for out, extra in ((ddp, []), (fsdp, ["--fsdp"]), (resumed, ["--fsdp", "--stop-at", "4"])):
            r = pretrain(out, *common, *extra, nproc=2, workers=0)
            self.assertEqual(r.returncode, 0, r.stderr)
        r = pretrain(resumed, *common, "--fsdp", "--resume", nproc=2, workers=0)
        self.assertEqual(r.returncode, 0, r.stderr)
        a, b, c = metrics(ddp), metrics(fsdp), metrics(resumed)
        self.assertEqual([m["step"] for m in b], list(range(1, 9)))
        for x, y, z in zip(a, b, c):
            self.assertLess(abs(x["loss"] - y["loss"]), 1e-4 * x["loss"], (x, y))
            self.assertLess(abs(x["grad_norm"] - y["grad_norm"]), 1e-4 * x["grad_norm"], (x, y))
            self.assertEqual(y["loss"], z["loss"], "an FSDP resume continues exactly")
        # Its checkpoint is an ordinary imglish checkpoint.
        probe = run([imglish_bin(), "probe", "--task", "retrieval", "--checkpoint", fsdp, "--dataset", dataset()])
        self.assertEqual(probe.returncode, 0, probe.stderr)

    def test_refusals(self):
        out = os.path.join(tmpdir(self), "run")
        r = pretrain(out, "--steps", "2", "--batch-size", "5", nproc=2)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("error: --batch-size 5 (the global micro-batch) is not a multiple of the world size 2", r.stderr)
        r = pretrain(out, "--steps", "2", "--batch-size", "4", nproc=1)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = pretrain(out, "--steps", "3", "--batch-size", "4", "--resume", nproc=1)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("written by a run with other settings: steps: 2 vs 3", r.stderr)
        # One writer per run folder, as `imglish train`: this process holds the folder's lock as a running
        # trainer would; the second one stops at once, naming the holder.
        held = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            r = pretrain(out, "--steps", "2", "--batch-size", "4", "--resume", nproc=1)
        finally:
            os.close(held)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(f"error: another imglish process (pid {os.getpid()}) is writing {out}; wait for it to finish or "
                      "stop it", r.stderr)


if __name__ == "__main__":
    unittest.main()
