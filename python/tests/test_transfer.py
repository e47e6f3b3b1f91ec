"""Transfer through the binary against timm, on original images timm can read exactly (32x32 PNGs, so the centre
view at a 32-pixel input is the image itself):

- `imglish embed --images MANIFEST` of a pixel-input BEiT checkpoint equals timm `Beit.forward_features` (CLS and
  patch mean) with the checkpoint's weights on the same pixels, within 1e-4;
- `imglish finetune --init timm.safetensors` without a pretraining checkpoint reads the architecture from the file
  and loads encoder, `fc_norm` and `head`: its step-0 evaluation (views from the original images) equals timm's
  loss and top-1 on the validation images.
"""

import json
import os
import shutil
import tempfile
import unittest

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models.beit import Beit

from common import imglish_bin, run, tmpdir

SIDE = 32


def ok(test, args):
    r = run([imglish_bin(), "-q"] + args)
    test.assertEqual(r.returncode, 0, f"{args[0]}: {r.stderr}")
    return r


def corpus(root):
    """Two classes of 20 RGB PNGs each, noise around a class colour."""
    rng = np.random.default_rng(7)
    for c, base in enumerate([(60, 90, 200), (200, 120, 40)]):
        folder = os.path.join(root, f"class{c}")
        os.makedirs(folder)
        for i in range(20):
            px = np.clip(np.array(base) + rng.normal(0, 60, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px, "RGB").save(os.path.join(folder, f"{i:02}.png"))


def val_images(manifest):
    """(sample_id, label, normalised [3, 32, 32] pixels) of the manifest's validation images."""
    table = pq.read_table(os.path.join(manifest, "samples.parquet")).to_pylist()
    out = []
    for r in table:
        if r["split"] != "val":
            continue
        px = np.asarray(Image.open(r["path"]).convert("RGB"), dtype=np.float32) / 255.0
        out.append((r["sample_id"], r["label"], torch.from_numpy((px - 0.5) / 0.5).permute(2, 0, 1)))
    return out


def timm_beit(**kw):
    return Beit(img_size=SIDE, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, qkv_bias=True,
                init_values=0.1, **kw)


class TransferTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="imglish-py-")
        cls.addClassCleanup(shutil.rmtree, cls.dir, True)
        d = lambda p: os.path.join(cls.dir, p)  # noqa: E731
        corpus(d("corpus"))
        cls.manifest, cls.dataset = d("manifest"), d("dataset")
        steps = [
            ["ingest", "--images", d("corpus"), "--labels", "from-folders", "--val-fraction", "0.25",
             "--out", cls.manifest],
            ["tokenizer", "fit", "--manifest", cls.manifest, "--out", d("tok.onnx"), "--patch", "16",
             "--input-size", str(SIDE), "--codebook", "8", "--features", "rgb"],
            ["tokenize", "--manifest", cls.manifest, "--tokenizer", d("tok.onnx"), "--views", "2", "--keep-pixels",
             "--out", d("tokens")],
            ["pack", "--tokens", d("tokens"), "--manifest", cls.manifest, "--include-pixels", "--out", cls.dataset],
        ]
        for args in steps:
            r = run([imglish_bin(), "-q"] + args)
            if r.returncode != 0:
                raise RuntimeError(f"{args[0]} failed: {r.stderr}")
        cls.val = val_images(cls.manifest)
        assert len(cls.val) >= 6, len(cls.val)

    def test_embed_of_original_images_equals_timm(self):
        run_dir = self.pretrained()
        out = os.path.join(tmpdir(self), "e.parquet")
        ok(self, ["embed", "--checkpoint", run_dir, "--dataset", self.dataset, "--images", self.manifest,
                  "--split", "val", "--out", out])
        ckpt = os.path.join(run_dir, "checkpoints", sorted(os.listdir(os.path.join(run_dir, "checkpoints")))[-1])
        model = timm_beit(num_classes=0, global_pool="", use_abs_pos_emb=False, use_shared_rel_pos_bias=True).eval()
        missing, unexpected = model.load_state_dict(load_file(os.path.join(ckpt, "model.safetensors")), strict=False)
        self.assertTrue(all("relative_position_index" in k for k in missing), missing)
        self.assertEqual(sorted(unexpected), ["lm_head.bias", "lm_head.weight", "mask_token"])
        rows = {r["sample_id"]: r for r in pq.read_table(out).to_pylist()}
        self.assertEqual(sorted(rows), sorted(s for s, _, _ in self.val))
        with torch.no_grad():
            x = model.forward_features(torch.stack([p for _, _, p in self.val]))
        for i, (sid, _, _) in enumerate(self.val):
            np.testing.assert_allclose(rows[sid]["cls"], x[i, 0].numpy(), atol=1e-4)
            np.testing.assert_allclose(rows[sid]["mean"], x[i, 1:].mean(0).numpy(), atol=1e-4)

    def test_finetune_from_a_timm_classifier_evaluates_as_timm(self):
        d = tmpdir(self)
        torch.manual_seed(3)
        model = timm_beit(num_classes=2, global_pool="avg", use_rel_pos_bias=True).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            model.head.weight.normal_(0, 1.0)
        weights = os.path.join(d, "timm.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        out = os.path.join(d, "ft")
        r = ok(self, ["finetune", "--init", weights, "--dataset", self.dataset, "--images", self.manifest,
                      "--out", out, "--steps", "1", "--batch-size", "4", "--eval-every", "1"])
        with open(os.path.join(out, "metrics.jsonl")) as f:
            first = next(m for m in map(json.loads, f) if m["kind"] == "val")
        self.assertEqual(first["step"], 0)
        labels = torch.tensor([label for _, label, _ in self.val])
        with torch.no_grad():
            logits = model(torch.stack([p for _, _, p in self.val]))
        self.assertEqual(first["samples"], len(self.val))
        self.assertAlmostEqual(first["loss"], torch.nn.functional.cross_entropy(logits, labels).item(), delta=1e-4)
        self.assertAlmostEqual(first["top1"], (logits.argmax(-1) == labels).float().mean().item(), places=6)
        del r

    def pretrained(self):
        run_dir = os.path.join(self.dir, "pre")
        if not os.path.exists(os.path.join(run_dir, "checkpoints")):
            ok(self, ["train", "--dataset", self.dataset, "--out", run_dir, "--input", "pixels", "--steps", "2",
                      "--batch-size", "4", "--dim", "32", "--depth", "2", "--heads", "2", "--lr", "1e-2"])
        return run_dir

    def test_views_from_originals_at_another_size_resume_exactly(self):
        """Fine-tuning at 48 pixels (grid 3x3, tables resized) on fresh crops of the originals: 2 steps + resume
        to 4 give the weights and evaluations of 4 uninterrupted steps."""
        d = tmpdir(self)
        args = ["--threads", "1", "finetune", "--checkpoint", self.pretrained(), "--dataset", self.dataset,
                "--images", self.manifest, "--input-size", "48", "--steps", "4", "--batch-size", "16",
                "--eval-every", "2"]
        whole, split = os.path.join(d, "whole"), os.path.join(d, "split")
        r = run([imglish_bin()] + args + ["--out", whole])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("resized to this grid: blocks.0.attn.relative_position_bias_table", r.stderr)
        ok(self, args + ["--out", split, "--stop-at", "2"])
        ok(self, args + ["--out", split, "--resume"])
        last = os.path.join("checkpoints", "step-00000004", "model.safetensors")
        a, b = (load_file(os.path.join(x, last)) for x in (whole, split))
        self.assertEqual(sorted(a), sorted(b))
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), k)

        def vals(run_dir):
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                return [m for m in map(json.loads, f) if m["kind"] == "val"]

        self.assertEqual(vals(whole), vals(split))
        self.assertEqual([m["step"] for m in vals(whole)], [0, 2, 4])
        with open(os.path.join(whole, "config.json")) as f:
            config = json.load(f)
        self.assertEqual(config["backbone"]["beit"]["grid"], [3, 3])
        self.assertEqual(config["images"], self.manifest)

    def test_verify_names_a_shard_whose_pixels_went_missing(self):
        """A dataset that announces pixels never holds a null one unnoticed: a shard rewritten (with its index entry
        updated, so size and hash agree) with one image row's pixels null fails verify, naming shard and sample."""
        d = os.path.join(tmpdir(self), "dataset")
        shutil.copytree(self.dataset, d)
        with open(os.path.join(d, "index.json")) as f:
            index = json.load(f)
        entry = index["shards"][0]
        path = os.path.join(d, entry["file"])
        table = ipc.open_file(path).read_all()
        rows = table.column("pixels").to_pylist()
        victim = next(i for i, (px, kind) in enumerate(zip(rows, table.column("kind").to_pylist()))
                      if px is not None and kind != 1)
        rows[victim] = None
        col = table.schema.get_field_index("pixels")
        table = table.set_column(col, table.schema.field(col), pa.array(rows, type=table.schema.field(col).type))
        options = ipc.IpcWriteOptions(compression="zstd")
        with ipc.new_file(path, table.schema, options=options) as w:
            for batch in table.to_batches(max_chunksize=max(1, table.num_rows // max(1, entry["batches"]))):
                w.write_batch(batch)
        data = open(path, "rb").read()
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        entry["batches"] = ipc.open_file(path).num_record_batches
        with open(os.path.join(d, "index.json"), "w") as f:
            json.dump(index, f, indent=2)
        r = run([imglish_bin(), "verify", d])
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        sample = table.column("sample_id")[victim].as_py()
        self.assertIn(f"{entry['file']}: 1 samples have no pixels (the first: sample {sample}), although index.json "
                      "says include_pixels", r.stdout + r.stderr)

    def test_misfits_of_original_images(self):
        d = tmpdir(self)
        pre = self.pretrained()

        def last_line(args):
            r = run([imglish_bin(), "finetune"] + args + ["--out", os.path.join(d, "x")])
            self.assertEqual(r.returncode, 1, r.stderr)
            return r.stderr.strip().splitlines()[-1]

        other = os.path.join(d, "other")
        os.makedirs(os.path.join(other, "a"))
        Image.new("RGB", (SIDE, SIDE), (10, 20, 30)).save(os.path.join(other, "a", "x.png"))
        Image.new("RGB", (SIDE, SIDE), (40, 20, 30)).save(os.path.join(other, "a", "y.png"))
        ok(self, ["ingest", "--images", other, "--out", os.path.join(d, "man2")])
        with open(os.path.join(self.dataset, "index.json")) as f:
            want = json.load(f)["manifest_fingerprint"][:12]
        with open(os.path.join(d, "man2", "ingest.json")) as f:
            got = json.load(f)["fingerprint"][:12]
        self.assertEqual(
            last_line(["--checkpoint", pre, "--dataset", self.dataset, "--images", os.path.join(d, "man2")]),
            f"error: fine-tuning on {self.dataset} failed: dataset {os.path.join(d, 'man2')}: manifest {got}, the "
            f"dataset {self.dataset} was tokenized from manifest {want} (give --images the ingest output the "
            "dataset was made from)",
        )
        self.assertEqual(
            last_line(["--checkpoint", pre, "--dataset", self.dataset, "--input-size", "40"]),
            "error: invalid configuration: --input-size 40 is not a positive multiple of the patch size 16",
        )
        bare = os.path.join(d, "bare")
        ok(self, ["pack", "--tokens", os.path.join(self.dir, "tokens"), "--manifest", self.manifest, "--out", bare])
        self.assertEqual(
            last_line(["--checkpoint", pre, "--dataset", bare]),
            f"error: dataset {bare}: holds no images for a pixel-input encoder: pack with --include-pixels, or give "
            "the original images with --images MANIFEST",
        )
        tokens_run = os.path.join(d, "tokens-run")
        ok(self, ["train", "--dataset", self.dataset, "--out", tokens_run, "--steps", "1", "--batch-size", "4",
                  "--dim", "32", "--depth", "1", "--heads", "2"])
        self.assertEqual(
            last_line(["--checkpoint", tokens_run, "--dataset", self.dataset, "--images", self.manifest]),
            "error: invalid configuration: --images needs a pixel-input encoder (this one reads the dataset's tokens)",
        )
        self.assertEqual(
            last_line(["--checkpoint", tokens_run, "--dataset", self.dataset, "--input-size", "48"]),
            "error: invalid configuration: --input-size needs a pixel-input encoder (a token-input one reads the "
            "tokenizer's grid)",
        )


if __name__ == "__main__":
    unittest.main()
