#!/usr/bin/env python3
"""Export OpenAI's DALL-E dVAE encoder to ONNX for imglish (logits path, logit-laplace eps 0.1, 112 input).

Runs in the project's torch venv, where `scripts/setup-libtorch` installs everything it needs (torch 2.13.0,
DALL-E 0.1 with attrs, onnx for torch's exporter):

    "$(scripts/setup-libtorch --python)" tokenizer/export/export_dall_e.py --weights encoder.pkl \\
        --out tokenizers/dall_e.onnx

`encoder.pkl` is the official weights file of the DALL-E release (download it yourself; imglish never does).
It is a whole pickled `dall_e.encoder.Encoder`: it is loaded with torch's `weights_only` unpickler and an allow
list of exactly the dall_e and torch.nn classes such a file holds (PyTorch >= 2.6 refuses other globals), never
with arbitrary unpickling. The model is exported by torch's TorchScript exporter into one self-contained .onnx
file (the encoder's ~215 MB of weights inside it, no external data file), and OUT.card.json is written beside it,
exactly the card `Card::dall_e` describes.

The encoder's input is map_pixels(x) = (1 - 2*0.1) * x + 0.1 with x in [0, 1]; imglish applies that itself
(normalization: logit-laplace), so the exported graph starts at the encoder's first convolution. Output: logits
[B, 8192, 14, 14]; imglish takes the argmax over the 8192 codes. python/tests/test_dall_e_export.py exports a
seeded random Encoder with this script and checks `imglish tokenize`'s tokens against PyTorch on the same pixels.
"""
import argparse
import collections
import os

import torch

from common import write_card


def allowed_globals():
    """The classes a pickled DALL-E encoder holds: dall_e's modules and the torch.nn containers it uses."""
    import dall_e.encoder
    import dall_e.utils

    return [
        dall_e.encoder.Encoder,
        dall_e.encoder.EncoderBlock,
        dall_e.utils.Conv2d,
        torch.nn.Sequential,
        torch.nn.ReLU,
        torch.nn.MaxPool2d,
        torch.nn.Identity,
        collections.OrderedDict,
        torch.device,
    ]


def load_encoder(path):
    with torch.serialization.safe_globals(allowed_globals()):
        enc = torch.load(path, map_location="cpu", weights_only=True)
    import dall_e.encoder

    if not isinstance(enc, dall_e.encoder.Encoder):
        raise SystemExit(f"{path}: holds a {type(enc).__name__}, not a dall_e Encoder")
    return enc.eval()


def export(enc, out, opset=17):
    vocab = enc.vocab_size
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.onnx.export(
        enc,
        (torch.zeros(1, 3, 112, 112),),
        out,
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    card = {
        "name": "dall-e-dvae-encoder",
        "input_size": 112,
        "normalization": {"kind": "logit-laplace", "eps": 0.1},
        "resize_filter": "lanczos3",
        "output": "logits",
        "grid": [14, 14],
        "vocab_size": vocab,
    }
    return write_card(out, card)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True, help="encoder.pkl of the DALL-E release")
    ap.add_argument("--out", required=True)
    ap.add_argument("--opset", type=int, default=17)
    args = ap.parse_args()
    enc = load_encoder(args.weights)
    card = export(enc, args.out, args.opset)
    print(f"wrote {args.out} and {card}")


if __name__ == "__main__":
    main()
