"""The peer of `imglish train --model beit3` in scripts/bench-beit3: torchscale 0.3.0's BEiT3 (the installed
package) with the same sizes, the same MIM and MLM heads and losses, AdamW, trained on batches of the same
shapes: per step an image group, a text group and a pair group of the sizes the imglish run saw, with its
masked-patch and masked-token counts. The contents are random (the cost of a step depends on the shapes only).
Prints one JSON line with the timing.

usage: python beit3_torch_loop.py RUN_CONFIG.json STEPS THREADS IMAGES TEXTS PAIRS TEXT_LEN
(RUN_CONFIG.json is the `config.json` that `imglish train --model beit3` wrote; IMAGES/TEXTS/PAIRS are samples
of each kind per step, TEXT_LEN the padded text length.)
"""

import json
import sys
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
from torchscale.architecture.config import EncoderConfig  # noqa: E402
from torchscale.model.BEiT3 import BEiT3  # noqa: E402


def main(config_path, steps, threads, images, texts, pairs, text_len):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    run = json.load(open(config_path))
    m = run["model"]
    h = m["grid"][0] * m["patch_size"]
    kwargs = dict(
        encoder_embed_dim=m["dim"], encoder_attention_heads=m["heads"], encoder_ffn_embed_dim=m["ffn_dim"],
        encoder_layers=m["depth"], multiway=True, no_output_layer=True, vocab_size=m["text_vocab_size"],
        img_size=h, patch_size=m["patch_size"], max_source_positions=m["max_source_positions"],
        layernorm_eps=m["layer_norm_eps"], drop_path_rate=m["drop_path"],
    )
    model = BEiT3(EncoderConfig(**kwargs))
    mim = torch.nn.Linear(m["dim"], m["vocab_size"])
    mlm = torch.nn.Linear(m["dim"], m["text_vocab_size"])
    params = list(model.parameters()) + list(mim.parameters()) + list(mlm.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    n = m["grid"][0] * m["grid"][1]
    obj = run["objective"]
    img_count = max(1, round(obj["image_masking"]["count"]))

    def image_batch(b):
        px = torch.rand(b, 3, h, h) * 2 - 1
        mask = torch.zeros(b, n, dtype=torch.bool)
        for i in range(b):
            mask[i, torch.randperm(n)[:img_count]] = True
        return px, mask, torch.randint(0, m["vocab_size"], (int(mask.sum()),))

    def text_batch(b, ratio):
        ids = torch.randint(5, m["text_vocab_size"], (b, text_len))
        pad = torch.zeros(b, text_len, dtype=torch.bool)
        pad[:, text_len * 3 // 4:] = True
        pred = (torch.rand(b, text_len) < ratio) & ~pad
        return ids, pad, pred, torch.randint(0, m["text_vocab_size"], (int(pred.sum()),))

    def step():
        opt.zero_grad()
        mim_loss, mlm_loss, nm, nt = 0.0, 0.0, 0, 0
        if images:
            px, mask, tgt = image_batch(images)
            x = model(visual_tokens=px, vision_masked_position=mask)["encoder_out"]
            mim_loss = mim_loss + F.cross_entropy(mim(x[:, 1:][mask]), tgt, reduction="sum")
            nm += len(tgt)
        if texts:
            ids, pad, pred, tgt = text_batch(texts, obj["text_ratio"])
            x = model(textual_tokens=ids, text_padding_position=pad)["encoder_out"]
            mlm_loss = mlm_loss + F.cross_entropy(mlm(x[pred]), tgt, reduction="sum")
            nt += len(tgt)
        if pairs:
            px, mask, itgt = image_batch(pairs)
            ids, pad, pred, ttgt = text_batch(pairs, obj["pair_text_ratio"])
            r = model(textual_tokens=ids, visual_tokens=px, text_padding_position=pad, vision_masked_position=mask)
            x, split = r["encoder_out"], r["multiway_split_position"]
            mim_loss = mim_loss + F.cross_entropy(mim(x[:, 1:split][mask]), itgt, reduction="sum")
            mlm_loss = mlm_loss + F.cross_entropy(mlm(x[:, split:][pred]), ttgt, reduction="sum")
            nm, nt = nm + len(itgt), nt + len(ttgt)
        loss = mim_loss / max(nm, 1) + mlm_loss / max(nt, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()

    model.train()
    step()  # warm-up, not timed (imglish's clock also starts after model construction)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print(json.dumps({"seconds": time.perf_counter() - start, "steps": steps}))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), int(a[5]), int(a[6]))
