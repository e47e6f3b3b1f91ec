"""Fine-tuning's classifier against timm: a timm `Beit` with mean pooling, `fc_norm` and a head
(`global_pool='avg'`, what BEiT fine-tunes), random weights moved off their structured init, saved as safetensors,
and the logits timm computes with it. `train/tests/finetune.rs` loads the file into `Classifier` (per-block
relative position tables; from timm's shared table when SPEC says so, as BEiT does) and compares.

usage: python timm_finetune.py SPEC.json OUT_DIR

SPEC: img_size, patch_size, dim, depth, heads, classes, rel_pos ("per-layer" | "shared"), seed. OUT_DIR gets
timm.safetensors and expected.safetensors (`pixels` [4, 3, S, S], `logits` [4, classes]).
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from timm.models.beit import Beit


def main():
    spec = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    torch.manual_seed(spec["seed"])
    model = Beit(img_size=spec["img_size"], patch_size=spec["patch_size"], num_classes=spec["classes"],
                 global_pool="avg", embed_dim=spec["dim"], depth=spec["depth"], num_heads=spec["heads"],
                 mlp_ratio=4.0, qkv_bias=True, use_abs_pos_emb=False,
                 use_rel_pos_bias=spec["rel_pos"] == "per-layer",
                 use_shared_rel_pos_bias=spec["rel_pos"] == "shared", init_values=0.1).eval()
    assert isinstance(model.norm, torch.nn.Identity), "mean pooling: no final norm, fc_norm instead"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out, "timm.safetensors"))
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    size = spec["img_size"]
    pixels = torch.rand(4, 3, size, size, generator=g) * 2 - 1
    with torch.no_grad():
        logits = model(pixels)
    save_file({"pixels": pixels.contiguous(), "logits": logits.contiguous()},
              os.path.join(out, "expected.safetensors"))


if __name__ == "__main__":
    main()
