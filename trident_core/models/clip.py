"""CLIP through open_clip: the one module that knows open_clip's model, tokenizer and prompt templates.

Trident needs of CLIP the image tower run up to its last block's value projection on each window, that block's
out-projection, the final projection into the joint space, and the text tower on the class names' prompts."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import CheckpointError, complete, expect_family, read_state_dict
from ..posembed import cached_pos_embed
from .conversion import FLOAT32, LO, PAIR, Layout, all_low, converted
from .loading import check_materialised, count_blocks, finite, load_strict, model_identity, on_meta, place
from .precision import attach_pairs, linear32, norm32, use_pairs

logger = logging.getLogger(__name__)

# Architectures OpenAI released; their weights were trained with QuickGELU (open_clip's plain configs use GELU).
OPENAI_ARCHS = {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"}
# Words in a weight file's name (or its folder's: Hugging Face repositories name the training there) that say how
# it was trained: open_clip's "-quickgelu" models, OpenAI's, MetaCLIP's and DFN's with QuickGELU; LAION's,
# DataComp's and CommonPool's with GELU (a ViT-B-16 of LAION-2B run with QuickGELU gives other features).
QUICK_GELU_WORDS = ("quickgelu", "quick_gelu", "openai", "metaclip", "dfn")
GELU_WORDS = ("laion", "datacomp", "commonpool")


def trained_with_quick_gelu(path: str | os.PathLike, arch: str) -> bool:
    """Whether a CLIP file's weights were trained with QuickGELU: by the words of its name and its folder's name
    where they say (QUICK_GELU_WORDS before GELU_WORDS), else by its architecture (OpenAI's)."""
    p = Path(path)
    for name in (p.name.lower(), p.parent.name.lower()):
        if any(w in name for w in QUICK_GELU_WORDS):
            return True
        if any(w in name for w in GELU_WORDS):
            return False
    return arch in OPENAI_ARCHS


@dataclass(eq=False)
class ClipModel:
    """An open_clip CLIP model plus what Trident needs to know of it."""

    model: nn.Module
    arch: str
    patch_size: int
    path: str
    quick_gelu: bool
    text_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    disk_cache: Path | None = field(default=None, repr=False)  # folder of text embeddings kept between runs
    positions: dict = field(default_factory=dict, repr=False)  # see posembed.cached_pos_embed

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    @property
    def identity(self) -> str:
        """Which CLIP made text embeddings or image features: its architecture and file, links resolved (another
        CLIP's embeddings of the same width compare as noise)."""
        return model_identity(self.arch, self.path)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the image tower's products run in (bfloat16 where its matrices are pairs: `load_clip`)."""
        return self.model.visual.transformer.resblocks[0].mlp.c_fc.weight.dtype

    @property
    def text_dtype(self) -> torch.dtype:
        """The text tower's dtype (float32 when the image tower is bfloat16: `load_clip`)."""
        return self.model.token_embedding.weight.dtype

    @property
    def embed_dim(self) -> int:
        """The joint image-text space's width E."""
        return self.model.text_projection.shape[1]

    @property
    def context_length(self) -> int:
        return self.model.positional_embedding.shape[0]

    # ------------------------------------------------------------------------------------------- image tower

    @torch.no_grad()
    def window_values(self, x: torch.Tensor, after_block: Callable[[nn.Module], object] | None = None
                      ) -> tuple[torch.Tensor, tuple[int, int]]:
        """V of the last block [k, g*g, D] (float32) for CLIP-normalised windows x [k, 3, w, w], and the token grid:
        patch embedding, interpolated positions, blocks 1..L-1, CLS dropped, ln_1, the value third of the
        in-projection (these two in float32). `after_block` gets each of blocks 1..L-1 once it has run."""
        v = self.model.visual
        x = x.to(device=self.device, dtype=v.conv1.weight.dtype)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        t = v.conv1(x).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(t.dtype).view(1, 1, -1).expand(t.shape[0], -1, -1)
        pos = cached_pos_embed(self.positions, v.positional_embedding, grid)
        t = torch.cat([cls, t], dim=1) + pos.to(t.dtype)[None]
        t = v.ln_pre(v.patch_dropout(t))
        blocks = v.transformer.resblocks
        for blk in blocks[:-1]:
            t = blk(t)
            if after_block is not None:
                after_block(blk)
        last = blocks[-1]
        dim = t.shape[-1]
        w, b = last.attn.in_proj_weight[2 * dim:], last.attn.in_proj_bias[2 * dim:]
        return finite(linear32(norm32(last.ln_1, t[:, 1:]), w, b), "CLIP", self.path), grid

    @torch.no_grad()
    def attention_output(self, o: torch.Tensor) -> torch.Tensor:
        """The last block's out-projection of attended values o [..., D], in float32."""
        proj = self.model.visual.transformer.resblocks[-1].attn.out_proj
        return linear32(o, proj.weight, proj.bias)

    @torch.no_grad()
    def project(self, tokens: torch.Tensor, check: bool = True) -> torch.Tensor:
        """ln_post and the projection into the joint space, [..., D] -> [..., E], in float32; `check`: refused
        where not finite (a caller that checks what it computes from them passes False: on a GPU each check
        waits for the queue)."""
        v = self.model.visual
        out = norm32(v.ln_post, tokens.to(self.device)) @ v.proj.float()
        return finite(out, "CLIP", self.path) if check else out

    # -------------------------------------------------------------------------------------------- text tower

    @staticmethod
    def templates() -> list:
        """open_clip's copy of OpenAI's 80 ImageNet prompt templates (the reference uses the same list)."""
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)

    @staticmethod
    def token_count(text: str) -> int:
        """Tokens CLIP's tokenizer gives `text`, start and end of text included."""
        from open_clip.tokenizer import _tokenizer

        return len(_tokenizer.encode(text)) + 2

    @staticmethod
    def tokenize(prompts: list[str]) -> torch.Tensor:
        """Prompts as token ids [P, 77]."""
        import open_clip

        return open_clip.tokenize(prompts)

    @torch.no_grad()
    def encode_prompts(self, tokens: torch.Tensor, after_block: Callable[[nn.Module], object] | None = None
                       ) -> torch.Tensor:
        """Text features [P, E] of tokenized prompts [P, 77], computed on the longest prompt's length: the text
        mask is causal and pooling takes the end-of-text token, so the padding changes nothing. `after_block`
        gets each block of the text tower once it has run (a batch-first tower: open_clip's own loop)."""
        m = self.model
        length = int(tokens.argmax(dim=-1).max()) + 1  # the end-of-text token has the largest id
        tokens = tokens[:, :length].to(self.device)
        dtype = self.text_dtype
        x = m.token_embedding(tokens).to(dtype) + m.positional_embedding[:length].to(dtype)
        mask = m.attn_mask[:length, :length].to(dtype)
        if after_block is None or not m.transformer.batch_first:
            x = m.transformer(x, attn_mask=mask)
        else:
            for blk in m.transformer.resblocks:
                x = blk(x, attn_mask=mask)
                after_block(blk)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return finite(x @ m.text_projection, "CLIP", self.path)


_VOCAB = 49408  # open_clip.tokenize's token ids (49406 and 49407 start and end every prompt)


def _clip_config(sd: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """open_clip config read off an OpenAI/open_clip-layout state dict; head widths from a matching named config."""
    import open_clip

    if "visual.proj" not in sd:
        kind = "a ResNet image tower" if "visual.layer1.0.conv1.weight" in sd else "no ViT image tower"
        raise CheckpointError(f"only ViT CLIP models are supported (this checkpoint has {kind}); use e.g. "
                              "ViT-B-16 (OpenAI's ViT-B-16.pt)")
    positions, context, vocab = (sd[k].shape[0] for k in ("visual.positional_embedding", "positional_embedding",
                                                          "token_embedding.weight"))
    if positions < 2:  # (it loaded, and the first image was a ZeroDivisionError)
        raise ValueError(f"its position table visual.positional_embedding "
                         f"{tuple(sd['visual.positional_embedding'].shape)} holds no patch positions")
    if context < 1:  # (every class name was "too long")
        raise ValueError(f"its position table positional_embedding {tuple(sd['positional_embedding'].shape)} is empty")
    if vocab < _VOCAB:  # (the first class name was an IndexError or index_select's message)
        raise ValueError(f"its token table token_embedding.weight has {vocab} rows, under the {_VOCAB} token ids of "
                         "CLIP's tokenizer")
    vision = dict(
        width=sd["visual.conv1.weight"].shape[0],
        layers=count_blocks(sd, "visual.transformer.resblocks."),
        patch_size=sd["visual.conv1.weight"].shape[-1],
        image_size=sd["visual.conv1.weight"].shape[-1]
        * round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1)),
    )
    text = dict(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=sd["ln_final.weight"].shape[0],
        layers=count_blocks(sd, "transformer.resblocks."),
    )
    embed_dim = sd["text_projection"].shape[1]
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        vc, tc = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if (cfg.get("embed_dim") == embed_dim and all(vc.get(k) == vision[k] for k in vision)
                and all(tc.get(k, 77 if k == "context_length" else 49408 if k == "vocab_size" else None) == text[k]
                        for k in text) and "hf_model_name" not in tc and not vc.get("timm_model_name")):
            vision["head_width"] = vc.get("head_width", 64)
            text["heads"] = tc.get("heads", text["width"] // 64)
            return name.removesuffix("-quickgelu"), dict(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)
    vision["head_width"] = 64
    text["heads"] = max(1, text["width"] // 64)
    arch = f"ViT-w{vision['width']}-L{vision['layers']}-p{vision['patch_size']}"
    logger.warning("CLIP %s matches none of open_clip's model configs: its attention heads are taken as 64 wide "
                   "(a checkpoint's tensors do not say); if its segmentations look wrong, use one of open_clip's "
                   "ViT models", arch)
    return arch, dict(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)


_PAIRS = (".attn.in_proj_weight", ".attn.out_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _bf16_layout(layers: int) -> Layout:
    """CLIP in bfloat16: the image tower's block matrices as pairs (models/precision.py; all blocks but the last,
    whose few products run in float32), everything else float32: the text tower (run once per class name, then
    cached: its embeddings are float32's), the norms, biases, embeddings and the projection (measured:
    docs/performance-bf16.md)."""
    head = "visual.transformer.resblocks."

    def layout(key: str) -> str:
        inner = key.startswith(head) and int(key[len(head):].split(".")[0]) < layers - 1
        return PAIR if inner and key.endswith(_PAIRS) else FLOAT32
    return layout


def load_clip(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              quick_gelu: bool | None = None, cache: Path | None = None) -> ClipModel:
    """Load a CLIP ViT from an open_clip state dict (.safetensors/.bin/.pt) or OpenAI's TorchScript file.

    `quick_gelu=None` uses QuickGELU where the file's name says its weights were trained with it, or for the
    architectures OpenAI released where it says nothing (`trained_with_quick_gelu`), else GELU (e.g. LAION's).
    `cache`: a folder where a bfloat16 copy is kept (`conversion.converted`)."""
    import open_clip

    sd = read_state_dict(path)
    expect_family(sd, "clip", path)
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):  # TorchScript extras
        sd.pop(key, None)
    with complete(path, "CLIP"):
        arch, cfg = _clip_config(sd)
        qg = trained_with_quick_gelu(path, arch) if quick_gelu is None else quick_gelu
        model = on_meta(lambda: open_clip.CLIP(**cfg, quick_gelu=qg))
    layout = _bf16_layout(cfg["vision_cfg"]["layers"]) if dtype == torch.bfloat16 else all_low
    sd = converted(sd, path, "clip", dtype, layout, cache)
    lows = {k: sd.pop(k) for k in [k for k in sd if k.endswith(LO)]}
    load_strict(model, sd, path, f"open_clip CLIP {arch}")
    attach_pairs(model, lows)
    n = model.positional_embedding.shape[0]  # the causal text mask is a non-persistent buffer: rebuilt as open_clip
    model.attn_mask = torch.full((n, n), float("-inf")).triu_(1)
    check_materialised(model, path)
    model = place(model, device)
    use_pairs(model)
    return ClipModel(model, arch, cfg["vision_cfg"]["patch_size"], str(path), qg)
