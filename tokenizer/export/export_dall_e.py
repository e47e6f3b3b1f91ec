#!/usr/bin/env python3
"""Export OpenAI's DALL-E dVAE encoder to ONNX for imglish (logits path, logit-laplace eps 0.1, 112 input).

Needs the official weights (encoder.pkl from the DALL-E release) and `pip install dall_e torch onnx onnxruntime`.
Not run in CI. Writes OUT.onnx and OUT.card.json, exactly the card `Card::dall_e` describes:

    python tokenizer/export/export_dall_e.py --weights encoder.pkl --out tokenizers/dall_e.onnx

The encoder's input is map_pixels(x) = (1 - 2*0.1) * x + 0.1 with x in [0, 1]; imglish applies that itself
(normalization: logit-laplace), so the exported graph starts at the encoder's first convolution. Output: logits
[B, 8192, 14, 14]; imglish takes the argmax over the 8192 codes.
"""
import argparse

import torch

from common import check_against_torch, write_card


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True, help="encoder.pkl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--opset", type=int, default=17)
    args = ap.parse_args()

    from dall_e import load_model

    enc = load_model(args.weights, torch.device("cpu")).eval()
    dummy = torch.zeros(1, 3, 112, 112)
    torch.onnx.export(
        enc, dummy, args.out, input_names=["pixels"], output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, opset_version=args.opset,
    )
    card = {
        "name": "dall-e-dvae-encoder",
        "input_size": 112,
        "normalization": {"kind": "logit-laplace", "eps": 0.1},
        "resize_filter": "lanczos3",
        "output": "logits",
        "grid": [14, 14],
        "vocab_size": 8192,
    }
    path = write_card(args.out, card)
    agree = check_against_torch(args.out, lambda x: enc(x).argmax(dim=1), 112, lambda p: 0.8 * p + 0.1)
    print(f"wrote {args.out} and {path}; ONNX Runtime agrees with PyTorch on {agree:.4%} of tokens")


if __name__ == "__main__":
    main()
