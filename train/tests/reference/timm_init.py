"""`--init` against timm: a randomly initialised timm `Beit` (weights moved off their structured init), saved as a
safetensors state dict, and what timm computes with it. `train/tests/init.rs` loads the file into the Rust model
with `init_params` and compares `forward_features`.

usage: python timm_init.py SPEC.json OUT_DIR

SPEC: img_size, patch_size, dim, depth, heads, mlp_ratio, rel_pos ("per-layer" | "shared" | "off"), abs_pos,
layer_scale, target_img_size (the Rust model's size: when it differs, the reference is timm at that size with
the state dict resized by timm's own functions, `resize_rel_pos_bias_table_simple` and `resample_abs_pos_embed`
(bicubic)), seed. OUT_DIR gets timm.safetensors (the state dict at img_size) and expected.safetensors (`pixels`
[3, 3, T, T], `features` [3, 1 + N, dim] from `forward_features`, after the final norm).
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_simple
from timm.models.beit import Beit


def build(spec, img_size):
    return Beit(img_size=img_size, patch_size=spec["patch_size"], num_classes=0, global_pool="token",
                embed_dim=spec["dim"], depth=spec["depth"], num_heads=spec["heads"], mlp_ratio=spec["mlp_ratio"],
                qkv_bias=True, use_abs_pos_emb=spec["abs_pos"], use_rel_pos_bias=spec["rel_pos"] == "per-layer",
                use_shared_rel_pos_bias=spec["rel_pos"] == "shared", init_values=spec["layer_scale"])


def main():
    spec = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    torch.manual_seed(spec["seed"])
    model = build(spec, spec["img_size"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out, "timm.safetensors"))
    size = spec["target_img_size"]
    if size != spec["img_size"]:
        target = build(spec, size).eval()
        grid = size // spec["patch_size"]
        resized = {}
        for k, v in sd.items():
            if "relative_position_index" in k:
                continue
            if k.endswith("relative_position_bias_table"):
                shape = target.state_dict()[k].shape
                v = resize_rel_pos_bias_table_simple(v, (grid, grid), tuple(shape))
            elif k == "pos_embed":
                v = resample_abs_pos_embed(v, new_size=(grid, grid), num_prefix_tokens=1, interpolation="bicubic",
                                           antialias=False)
            resized[k] = v
        missing, unexpected = target.load_state_dict(resized, strict=False)
        assert all("relative_position_index" in k for k in missing) and not unexpected, (missing, unexpected)
        model = target
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    pixels = torch.rand(3, 3, size, size, generator=g) * 2 - 1
    with torch.no_grad():
        features = model.forward_features(pixels)
    save_file({"pixels": pixels.contiguous(), "features": features.contiguous()},
              os.path.join(out, "expected.safetensors"))


if __name__ == "__main__":
    main()
