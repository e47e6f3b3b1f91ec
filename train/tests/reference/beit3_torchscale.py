"""Runs torchscale 0.3.0's BEiT3 (the installed package, not a copy) on weights and inputs written by the Rust
BEiT-3 model, for `train/tests/beit3_reference.rs`.

usage: python beit3_torchscale.py TORCHSCALE.json WEIGHTS.safetensors INPUTS.safetensors OUT.safetensors

TORCHSCALE.json holds the `EncoderConfig` keyword arguments (`Beit3Config::torchscale_kwargs`). WEIGHTS holds
the encoder under torchscale's names, loaded with `load_state_dict(strict=True)`, plus imglish's heads
(`mim_head.{weight,bias}`, `mlm_head.bias` and, untied, `mlm_head.weight`). INPUTS holds `pixels` [B,3,H,W],
`image_mask` [B,N] (uint8), `text` [B,L] int64, `padding` [B,L] (uint8, 1 = pad) and `text_predict` [B,L]
(uint8). OUT gets, for each case (`image`, `text`, `pair`), `<case>.encoder` (encoder_out), and the MIM logits
of the masked patches (`<case>.mim`) and MLM logits of the predicted text positions (`<case>.mlm`) where the case
has them.
"""

import json
import sys
import warnings

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore")
from torchscale.architecture.config import EncoderConfig  # noqa: E402
from torchscale.model.BEiT3 import BEiT3  # noqa: E402


def main(config_path, weights_path, inputs_path, out_path):
    kwargs = json.load(open(config_path))
    model = BEiT3(EncoderConfig(**kwargs))
    weights = load_file(weights_path)
    heads = {k: v for k, v in weights.items() if k.startswith(("mim_head.", "mlm_head."))}
    encoder = {k: v for k, v in weights.items() if k not in heads}
    model.load_state_dict(encoder, strict=True)
    model.eval()
    mlm_weight = heads.get("mlm_head.weight", encoder["text_embed.weight"])

    inputs = load_file(inputs_path)
    pixels, image_mask = inputs["pixels"], inputs["image_mask"].bool()
    text, padding, predict = inputs["text"], inputs["padding"].bool(), inputs["text_predict"].bool()
    n = image_mask.shape[1]

    def mim(vision):
        patches = vision[:, 1 : 1 + n]
        return F.linear(patches[image_mask], heads["mim_head.weight"], heads["mim_head.bias"])

    def mlm(txt):
        return F.linear(txt[predict], mlm_weight, heads["mlm_head.bias"])

    out = {}
    with torch.no_grad():
        x = model(visual_tokens=pixels, vision_masked_position=image_mask)["encoder_out"]
        out["image.encoder"], out["image.mim"] = x, mim(x)
        x = model(textual_tokens=text, text_padding_position=padding)["encoder_out"]
        out["text.encoder"], out["text.mlm"] = x, mlm(x)
        r = model(
            textual_tokens=text,
            visual_tokens=pixels,
            text_padding_position=padding,
            vision_masked_position=image_mask,
        )
        x, split = r["encoder_out"], r["multiway_split_position"]
        out["pair.encoder"], out["pair.mim"], out["pair.mlm"] = x, mim(x[:, :split]), mlm(x[:, split:])
    save_file({k: v.contiguous() for k, v in out.items()}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:5])
