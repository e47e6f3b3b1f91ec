"""tokenizer/export/export_dall_e.py with the pinned torch: a seeded random `dall_e` Encoder, pickled whole as the
official encoder.pkl is, goes through the script as documented (weights_only loading with its allow list, the
TorchScript exporter, the card), and imglish's tokens of real images equal PyTorch's on the same pixels."""

import glob
import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch

from common import imglish_bin

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "tokenizer", "export", "export_dall_e.py")


def run_ok(args):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


class DallEExport(unittest.TestCase):
    def test_exported_encoder_tokenizes_like_pytorch(self):
        from dall_e import map_pixels
        from dall_e.encoder import Encoder
        from PIL import Image

        tmp = tempfile.mkdtemp(prefix="imglish-dall-e-")
        d = lambda *p: os.path.join(tmp, *p)  # noqa: E731
        torch.manual_seed(0)
        enc = Encoder(n_hid=64, n_blk_per_group=1)
        torch.save(enc, d("encoder.pkl"))
        run_ok([sys.executable, SCRIPT, "--weights", d("encoder.pkl"), "--out", d("tok", "dall_e.onnx")])
        card = json.load(open(d("tok", "dall_e.card.json")))
        self.assertEqual((card["vocab_size"], card["grid"], card["output"]), (8192, [14, 14], "logits"))
        self.assertEqual(glob.glob(d("tok", "*.data")), [], "the export must be one self-contained file")

        # Images at the tokenizer's input size, so that view 0 is the image itself (no resampling).
        rng = np.random.default_rng(0)
        os.makedirs(d("images"))
        pixels = {}
        for i in range(8):
            # Smooth colour fields plus noise: structure the random encoder responds to, far from ties.
            yy, xx = np.mgrid[0:112, 0:112] / 112.0
            base = np.stack([np.sin(6.3 * (xx * rng.uniform(0.5, 3) + yy * rng.uniform(0.5, 3)) + c) for c in range(3)], -1)
            img = np.clip((base * 0.5 + 0.5) * 200 + rng.integers(0, 56, size=(112, 112, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d("images", f"img{i}.png"))
            pixels[f"img{i}.png"] = img

        exe = imglish_bin()
        run_ok([exe, "-q", "ingest", "--images", d("images"), "--out", d("manifest")])
        run_ok([exe, "-q", "tokenize", "--manifest", d("manifest"), "--tokenizer", d("tok", "dall_e.onnx"),
                "--views", "1", "--out", d("tokens")])
        run_ok([exe, "-q", "pack", "--tokens", d("tokens"), "--out", d("dataset")])

        keys = {r["sample_id"]: os.path.basename(r["key"])
                for r in pq.read_table(d("manifest", "samples.parquet"), columns=["sample_id", "key"]).to_pylist()}
        ours = {}
        for shard in glob.glob(d("dataset", "**", "*.arrow"), recursive=True):
            table = ipc.open_file(shard).read_all()
            for sid, toks, crops in zip(table["sample_id"].to_pylist(), table["tokens"].to_pylist(),
                                        table["crops"].to_pylist()):
                self.assertEqual(crops[0], [0, 0, 112, 112])
                ours[keys[sid]] = np.array(toks[0]).reshape(14, 14)
        self.assertEqual(sorted(ours), sorted(pixels))

        names = sorted(pixels)
        x = torch.from_numpy(np.stack([pixels[n] for n in names])).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            logits = enc(map_pixels(x))
        ref = logits.argmax(1).numpy()
        mine = np.stack([ours[n] for n in names])
        equal = (mine == ref).mean()
        top2 = logits.topk(2, dim=1).values
        margin = (top2[:, 0] - top2[:, 1]).numpy()
        # Every difference must be a near-tie of PyTorch's own logits.
        self.assertGreaterEqual(equal, 0.999, f"tokens equal on {equal:.4%}; margins at differences "
                                f"{sorted(margin[mine != ref])[-5:]}")
        self.assertTrue(np.all(margin[mine != ref] < 1e-3))


if __name__ == "__main__":
    unittest.main()
