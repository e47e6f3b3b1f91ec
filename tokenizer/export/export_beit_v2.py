#!/usr/bin/env python3
"""Export the BEiT v2 VQ-KD visual tokenizer to ONNX for imglish (indices path, 224 input, 14x14 grid).

Needs the official checkpoint (e.g. vqkd_encoder_base_decoder_3x768x12_clip.pth), the unilm `beit2` sources on
PYTHONPATH (modeling_vqkd.py); torch, timm and onnx come with the project's torch venv (`scripts/setup-libtorch`).
Not run in CI (the checkpoint and the unilm sources are not in a package registry):

    PYTHONPATH=unilm/beit2 python tokenizer/export/export_beit_v2.py --weights vqkd.pth --out tokenizers/beit_v2.onnx

The VQ-KD model normalises its input itself (its scaling layer, ImageNet mean/std) from pixels in [0, 1], so the
card says mean-std with mean 0 and std 1 (x / 255); the exported graph ends with the code indices reshaped to
[B, 14, 14] (int64), exported by torch's TorchScript exporter into one self-contained file. When the Python
`onnxruntime` package is importable the script checks it against PyTorch on random images.
"""
import argparse

import torch

from common import check_against_torch, write_card


class Indices(torch.nn.Module):
    def __init__(self, vqkd):
        super().__init__()
        self.vqkd = vqkd

    def forward(self, x):
        idx = self.vqkd.get_codebook_indices(x)
        return idx.reshape(x.shape[0], 14, 14).to(torch.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--model", default="vqkd_encoder_base_decoder_3x768x12_clip")
    ap.add_argument("--out", required=True)
    ap.add_argument("--opset", type=int, default=17)
    args = ap.parse_args()

    import modeling_vqkd  # noqa: F401  (registers the timm models)
    from timm.models import create_model

    vqkd = create_model(args.model, pretrained=True, pretrained_weight=args.weights, as_tokenzer=True).eval()
    model = Indices(vqkd).eval()
    torch.onnx.export(
        model, torch.zeros(1, 3, 224, 224), args.out, input_names=["pixels"], output_names=["tokens"],
        dynamic_axes={"pixels": {0: "batch"}, "tokens": {0: "batch"}}, opset_version=args.opset, dynamo=False,
    )
    card = {
        "name": "beit-v2-vqkd",
        "input_size": 224,
        "normalization": {"kind": "mean-std", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "resize_filter": "bicubic",
        "output": "indices",
        "grid": [14, 14],
        "vocab_size": 8192,
    }
    path = write_card(args.out, card)
    agree = check_against_torch(args.out, model, 224, lambda p: p)
    check = "not checked (no onnxruntime module)" if agree is None else f"ONNX Runtime agrees with PyTorch on {agree:.4%} of tokens"
    print(f"wrote {args.out} and {path}; {check}")


if __name__ == "__main__":
    main()
