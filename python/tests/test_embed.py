"""imglish embed: the Parquet features equal those of the same checkpoint loaded into the PyTorch models
(torchscale BEiT3 / timm Beit), for images and captions, and a second run gives the same bytes."""

import hashlib
import json
import os
import subprocess
import unittest

import numpy as np
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from common import dataset, imglish_bin, run, tmpdir
from imglish.models import Beit3Pretrain


def checkpoint_dir(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    return os.path.join(root, sorted(os.listdir(root))[-1])


def view0_tokens(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".arrow"):
            for r in ipc.open_file(os.path.join(path, f)).read_all().to_pylist():
                if r["tokens"]:
                    out[r["sample_id"]] = (r["tokens"][0], r["captions"])
    return out


class EmbedTest(unittest.TestCase):
    def test_features_equal_the_pytorch_model(self):
        d = tmpdir(self)
        run_dir = os.path.join(os.path.dirname(dataset()), "run")
        out = os.path.join(d, "e.parquet")
        r = run([imglish_bin(), "embed", "--checkpoint", run_dir, "--dataset", dataset(), "--out", out])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.startswith("embed: "), r.stdout)
        again = os.path.join(d, "again.parquet")
        r = run([imglish_bin(), "embed", "--checkpoint", run_dir, "--dataset", dataset(), "--out", again])
        self.assertEqual(r.returncode, 0, r.stderr)
        digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
        self.assertEqual(digest(out), digest(again))
        # Off a terminal, progress lines count samples out of the dataset's total.
        with open(os.path.join(dataset(), "index.json")) as f:
            total = sum(s["rows"] for s in json.load(f)["shards"])
        third = os.path.join(d, "third.parquet")
        r = subprocess.run([imglish_bin(), "embed", "--checkpoint", run_dir, "--dataset", dataset(), "--out", third],
                           capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, IMGLISH_PROGRESS_SECS="0.001"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"progress: embedding samples: 0/{total} (", r.stderr)

        ckpt = checkpoint_dir(run_dir)
        with open(os.path.join(ckpt, "state.json")) as f:
            config = json.load(f)["config"]
        model = Beit3Pretrain(config["model"])
        model.load_imglish_state_dict(load_file(os.path.join(ckpt, "model.safetensors")))
        model.eval()
        rows = pq.read_table(out).to_pylist()
        samples = view0_tokens(dataset())
        images = [r for r in rows if r["kind"] == "image"][:16]
        texts = [r for r in rows if r["kind"] == "text"][:16]
        self.assertTrue(images and texts)
        with torch.no_grad():
            tokens = torch.tensor([samples[r["sample_id"]][0] for r in images], dtype=torch.int64)
            x = model.beit3(visual_tokens=tokens)["encoder_out"]
            np.testing.assert_allclose(np.array([r["cls"] for r in images]), x[:, 0].numpy(), atol=1e-4)
            np.testing.assert_allclose(np.array([r["mean"] for r in images]), x[:, 1:].mean(1).numpy(), atol=1e-4)
            for r in texts:
                ids = torch.tensor([samples[r["sample_id"]][1][r["caption"]]], dtype=torch.int64)
                x = model.beit3(textual_tokens=ids)["encoder_out"]
                np.testing.assert_allclose(np.array(r["cls"]), x[0, 0].numpy(), atol=1e-4)
                np.testing.assert_allclose(np.array(r["mean"]), x[0].mean(0).numpy(), atol=1e-4)


if __name__ == "__main__":
    unittest.main()
