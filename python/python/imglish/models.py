"""The BEiT-3 pretraining model in PyTorch: torchscale 0.3.0's ``BEiT3`` (the installed package) with imglish's
MIM and MLM heads, under the parameter names ``imglish train --model beit3`` writes (torchscale's, plus
``mim_head.*`` and ``mlm_head.*``; token input adds ``vision_embed.token_embed.weight``)."""

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def torchscale_kwargs(model):
    """torchscale ``EncoderConfig`` keyword arguments for an imglish ``Beit3Config`` (a dict)."""
    gh, gw = model["grid"]
    if gh != gw:
        raise ValueError(f"torchscale's BEiT3 takes square images; this model's grid is {gh}x{gw}")
    if model.get("vl_experts", 0) > 0:
        raise ValueError("torchscale's BEiT3 has no vision-language experts (--vl-experts); train it with imglish train")
    if model.get("layer_scale_init") is not None:
        raise ValueError("torchscale's BEiT3 has no LayerScale (--layer-scale); train it with imglish train")
    return {
        "encoder_embed_dim": model["dim"],
        "encoder_attention_heads": model["heads"],
        "encoder_ffn_embed_dim": model["ffn_dim"],
        "encoder_layers": model["depth"],
        "multiway": True,
        "subln": True,
        "normalize_output": True,
        "no_output_layer": True,
        "layernorm_embedding": False,
        "no_scale_embedding": True,
        "vocab_size": model["text_vocab_size"],
        "img_size": gh * model["patch_size"],
        "patch_size": model["patch_size"],
        "in_chans": 3,
        "max_source_positions": model["max_source_positions"],
        "layernorm_eps": model["layer_norm_eps"],
        "drop_path_rate": model["drop_path"],
    }


def imglish_name(fqn):
    """A parameter's imglish checkpoint name: its PyTorch name without the wrapped model's prefix."""
    for prefix in ("beit3.", "beit."):
        if fqn.startswith(prefix):
            return fqn[len(prefix) :]
    return fqn


class ImglishNames:
    """Checkpoint I/O under imglish's names, for the pretraining modules below."""

    def _named(self):
        return {imglish_name(n): p for n, p in self.named_parameters()}

    def imglish_state_dict(self):
        """Parameters under imglish's checkpoint names (float32, contiguous, on the CPU)."""
        return {k: p.detach().float().contiguous().cpu() for k, p in self._named().items()}

    def imglish_names(self):
        """Parameter → imglish name."""
        return {p: k for k, p in self._named().items()}

    def load_imglish_state_dict(self, tensors):
        """Loads a checkpoint's tensors; a missing, extra or misshaped one is an error naming it."""
        want = self._named()
        extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
        if extra or missing:
            raise ValueError(f"checkpoint tensors do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for k, p in want.items():
                if tuple(tensors[k].shape) != tuple(p.shape):
                    raise ValueError(f"tensor '{k}' has shape {tuple(tensors[k].shape)}, the model's is {tuple(p.shape)}")
                p.copy_(tensors[k])


class TokenVisionEmbedding(nn.Module):
    """torchscale's ``VisionEmbedding`` reading visual token ids instead of pixels (imglish's token input):
    ``token_embed`` rows instead of the patch projection; mask token and CLS token as torchscale's."""

    def __init__(self, vocab_size, num_patches, dim):
        super().__init__()
        self.num_patches = num_patches
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def num_position_embeddings(self):
        return self.num_patches + 1

    def forward(self, x, masked_position=None, **kwargs):
        x = self.token_embed(x)
        b, n, _ = x.shape
        if masked_position is not None:
            w = masked_position.unsqueeze(-1).type_as(x)
            x = x * (1 - w) + self.mask_token.expand(b, n, -1) * w
        return torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)


class Beit3Pretrain(ImglishNames, nn.Module):
    """BEiT-3 with its MIM and MLM heads; ``forward(batch)`` returns the summed MIM and MLM cross-entropies of
    an imglish batch (``StreamingDataset`` arrays as tensors) and per-task tallies."""

    def __init__(self, model):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchscale.architecture.config import EncoderConfig
            from torchscale.model.BEiT3 import BEiT3
        self.config = model
        self.num_patches = model["grid"][0] * model["grid"][1]
        self.beit3 = BEiT3(EncoderConfig(**torchscale_kwargs(model)))
        dim = model["dim"]
        if model["input"] == "tokens":
            self.beit3.vision_embed = TokenVisionEmbedding(model["vocab_size"], self.num_patches, dim)
        self.mim_head = nn.Linear(dim, model["vocab_size"])
        self.mlm_head = nn.Module()
        self.mlm_head.bias = nn.Parameter(torch.zeros(model["text_vocab_size"]))
        if not model["tie_mlm_head"]:
            self.mlm_head.weight = nn.Parameter(torch.zeros(model["text_vocab_size"], dim))
        self._initialise(model)

    def _initialise(self, model):
        std = model["init_std"]
        scale = math.sqrt(math.log(2 * model["depth"]))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name or "_ln." in name:
                    p.fill_(1.0) if name.endswith(".weight") else p.zero_()
                elif ".proj." in name and name.startswith("beit3.vision_embed."):
                    continue  # PyTorch's Conv2d default, as imglish
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
                    if name.startswith("beit3.encoder.layers.") and any(
                        s in name for s in ("fc1.", "fc2.", "out_proj.", "v_proj.")
                    ):
                        p.mul_(scale)

    def _mim(self, x, mask, tokens):
        patches = x[:, 1 : 1 + self.num_patches]
        logits = self.mim_head(patches[mask]).float()
        targets = tokens[mask]
        return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum(), targets.numel()

    def _mlm(self, x, predict, targets):
        weight = self.mlm_head.weight if hasattr(self.mlm_head, "weight") else self.beit3.text_embed.weight
        logits = F.linear(x[predict], weight, self.mlm_head.bias).float()
        return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum(), targets.numel()

    def _image(self, batch, kind):
        return batch.get(f"{kind}.pixels", batch.get(f"{kind}.tokens"))

    def forward(self, batch):
        """(MIM sum, MLM sum, tallies): tallies maps task → (loss sum, correct, count) as floats/ints."""
        zero = self.mim_head.bias.sum() * 0.0
        sums = [zero, zero]
        tally = {}

        def add(slot, task, result):
            loss, correct, count = result
            if count:
                sums[slot] = sums[slot] + loss
                tally[task] = (loss.detach(), correct.detach(), count)

        if "image.ids" in batch:
            mask = batch["image.mask"]
            x = self.beit3(visual_tokens=self._image(batch, "image"), vision_masked_position=mask)["encoder_out"]
            add(0, "image_mim", self._mim(x, mask, batch["image.tokens"]))
        if "text.ids" in batch:
            x = self.beit3(textual_tokens=batch["text.text"], text_padding_position=batch["text.padding"])
            add(1, "text_mlm", self._mlm(x["encoder_out"], batch["text.predict"], batch["text.targets"]))
        if "pair.ids" in batch:
            mask = batch["pair.mask"]
            r = self.beit3(
                textual_tokens=batch["pair.text"],
                visual_tokens=self._image(batch, "pair"),
                text_padding_position=batch["pair.padding"],
                vision_masked_position=mask,
            )
            x, split = r["encoder_out"], r["multiway_split_position"]
            add(0, "pair_mim", self._mim(x[:, :split], mask, batch["pair.tokens"]))
            add(1, "pair_mlm", self._mlm(x[:, split:], batch["pair.predict"], batch["pair.targets"]))
        return sums[0], sums[1], tally


def decays(name, dims):
    """Whether weight decay applies (imglish's rule: not 1-d tensors, biases, position tables, special tokens)."""
    leaf = name.rsplit(".", 1)[-1]
    special = (
        leaf in ("cls_token", "mask_token", "pos_embed")
        or "relative_position_bias_table" in name
        or name.startswith("encoder.embed_positions.")
    )
    return dims > 1 and not name.endswith(".bias") and not special


class BeitPretrain(ImglishNames, nn.Module):
    """BEiT v1 masked image modelling on timm's ``Beit`` (the installed package), with imglish's mask token, LM
    head and, for token input, ``token_embed`` instead of ``patch_embed``, under the names ``imglish train``
    writes (timm's ``beit_*`` names). ``forward(batch)`` returns the summed MIM cross-entropy, 0, and tallies."""

    def __init__(self, model):
        super().__init__()
        from functools import partial

        from timm.models.beit import Beit

        self.config = model
        gh, gw = model["grid"]
        self.num_patches = gh * gw
        dim = model["dim"]
        rel = model["rel_pos_bias"]
        self.beit = Beit(
            img_size=(gh * model["patch_size"], gw * model["patch_size"]),
            patch_size=model["patch_size"],
            num_classes=0,
            global_pool="token",
            embed_dim=dim,
            depth=model["depth"],
            num_heads=model["heads"],
            mlp_ratio=model["mlp_ratio"],
            qkv_bias=True,
            drop_path_rate=model["drop_path"],
            norm_layer=partial(nn.LayerNorm, eps=model["layer_norm_eps"]),
            init_values=model.get("layer_scale_init"),
            use_abs_pos_emb=model["abs_pos_emb"],
            use_rel_pos_bias=rel == "per_layer",
            use_shared_rel_pos_bias=rel == "shared",
        )
        if model["input"] == "tokens":
            self.beit.patch_embed = None
            self.token_embed = nn.Embedding(model["vocab_size"], dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.lm_head = nn.Linear(dim, model["vocab_size"])
        std = model["init_std"]
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in ("mask_token", "beit.cls_token", "beit.pos_embed", "token_embed.weight", "lm_head.weight"):
                    nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
                elif name == "lm_head.bias":
                    p.zero_()

    def forward(self, batch):
        mask, tokens = batch["mask"], batch["tokens"]
        if "pixels" in batch:
            x = self.beit.patch_embed(batch["pixels"])
        else:
            x = self.token_embed(tokens)
        b, n, _ = x.shape
        w = mask.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token.expand(b, n, -1) * w
        x = torch.cat((self.beit.cls_token.expand(b, -1, -1), x), dim=1)
        if self.beit.pos_embed is not None:
            x = x + self.beit.pos_embed
        rel = self.beit.rel_pos_bias() if self.beit.rel_pos_bias is not None else None
        for blk in self.beit.blocks:
            x = blk(x, shared_rel_pos_bias=rel)
        x = self.beit.norm(x)
        logits = self.lm_head(x[:, 1:][mask]).float()
        targets = tokens[mask]
        loss = F.cross_entropy(logits, targets, reduction="sum")
        zero = self.lm_head.bias.sum() * 0.0
        tally = {"mim": (loss.detach(), (logits.argmax(-1) == targets).sum().detach(), targets.numel())}
        return loss, zero, tally
