"""An independent PyTorch implementation of the BEiT encoder + MIM head, written after the reference BEiT
pretraining code (microsoft/unilm `beit/modeling_pretrain.py`) and timm's `beit_*` models, with their parameter
names. `train/tests/reference.rs` runs it on weights and inputs written by the Rust model and compares outputs
and gradients.

usage: python beit_reference.py CONFIG.json WEIGHTS.safetensors INPUTS.safetensors OUT.safetensors

INPUTS holds `tokens` [B,N] int64 or `pixels` [B,3,H,W] float32, and `mask` [B,N] bool; OUT gets `features`
[B,N+1,D] (after the final norm), `logits` [M,V] (masked positions), `loss` (mean cross-entropy against the
view's tokens `targets` [B,N]) and `grad.<name>` for every parameter.
"""

import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def relative_position_index(h, w):
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    n, d = h * w, (2 * h - 1) * (2 * w - 1) + 3
    index = torch.zeros(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = d - 3
    index[0:, 0] = d - 2
    index[0, 0] = d - 1
    return index


def table_bias(table, index):
    n = index.shape[0]
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


class RelativePositionBias(nn.Module):
    def __init__(self, grid, heads):
        super().__init__()
        h, w = grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1) + 3, heads))
        self.register_buffer("relative_position_index", relative_position_index(h, w), persistent=False)

    def forward(self):
        return table_bias(self.relative_position_bias_table, self.relative_position_index)


class Attention(nn.Module):
    def __init__(self, dim, heads, grid, per_layer_table):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        if per_layer_table:
            h, w = grid
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1) + 3, heads))
            self.register_buffer("relative_position_index", relative_position_index(h, w), persistent=False)
        else:
            self.relative_position_bias_table = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rel_pos_bias=None):
        b, n, c = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.relative_position_bias_table is not None:
            attn = attn + table_bias(self.relative_position_bias_table, self.relative_position_index).unsqueeze(0)
        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, eps = cfg["dim"], cfg["layer_norm_eps"]
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, cfg["heads"], cfg["grid"], cfg["rel_pos_bias"] == "per_layer")
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * cfg["mlp_ratio"]))
        if cfg["layer_scale_init"] is not None:
            self.gamma_1 = nn.Parameter(cfg["layer_scale_init"] * torch.ones(dim))
            self.gamma_2 = nn.Parameter(cfg["layer_scale_init"] * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x, rel_pos_bias=None):
        if self.gamma_1 is None:
            x = x + self.attn(self.norm1(x), rel_pos_bias)
            return x + self.mlp(self.norm2(x))
        x = x + self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class BeitForMaskedImageModeling(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, n = cfg["dim"], cfg["grid"][0] * cfg["grid"][1]
        self.tokens_input = cfg["input"] == "tokens"
        if self.tokens_input:
            self.token_embed = nn.Embedding(cfg["vocab_size"], dim)
        else:
            self.patch_embed = PatchEmbed(cfg["patch_size"], dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim)) if cfg["abs_pos_emb"] else None
        if cfg["rel_pos_bias"] == "shared":
            self.rel_pos_bias = RelativePositionBias(cfg["grid"], cfg["heads"])
        else:
            self.rel_pos_bias = None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg["depth"])])
        self.norm = nn.LayerNorm(dim, eps=cfg["layer_norm_eps"])
        self.lm_head = nn.Linear(dim, cfg["vocab_size"])

    def forward(self, x, mask):
        x = self.token_embed(x) if self.tokens_input else self.patch_embed(x)
        w = mask.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token.expand(x.shape[0], x.shape[1], -1) * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        rel = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, rel)
        features = self.norm(x)
        return features, self.lm_head(features[:, 1:][mask])


def main():
    config_path, weights, inputs_path, out_path = sys.argv[1:5]
    with open(config_path) as f:
        cfg = json.load(f)
    torch.manual_seed(0)
    model = BeitForMaskedImageModeling(cfg)
    model.load_state_dict(load_file(weights), strict=True)
    model.eval()
    inputs = load_file(inputs_path)
    x = inputs["tokens"] if "tokens" in inputs else inputs["pixels"]
    mask = inputs["mask"].bool()
    features, logits = model(x, mask)
    loss = F.cross_entropy(logits, inputs["targets"][mask])
    loss.backward()
    out = {"features": features.detach(), "logits": logits.detach(), "loss": loss.detach().reshape(1)}
    for name, p in model.named_parameters():
        out["grad." + name] = p.grad.detach().contiguous()
    save_file(out, out_path)


if __name__ == "__main__":
    main()
