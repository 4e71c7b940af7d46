"""Class-name embeddings against open_clip's own text path: prompts batched by length and trimmed give what
`CLIP.encode_text` gives on the full 77 tokens, whatever the batch size."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F

import trident_core.text as text
from trident_core.models import load_clip

NAMES = ["sky", "a very long and winding mountain road", "person", "tv monitor", "x", "potted plant in a pot"]


def _open_clip_embeddings(clip, names: list[str]) -> torch.Tensor:
    """Per name: open_clip's encode_text of its 80 prompts (77 tokens each), normalised, averaged, normalised."""
    out = []
    for name in names:
        feats = clip.model.encode_text(open_clip.tokenize([t(name) for t in clip.templates()]))
        out.append(F.normalize(F.normalize(feats, dim=-1).mean(dim=0), dim=-1))
    return torch.stack(out)


def test_names_batched_by_length_equal_open_clips_text_path(small_ckpts, monkeypatch):
    clip = load_clip(small_ckpts["clip"])
    with torch.no_grad():
        expected = _open_clip_embeddings(clip, NAMES)
    for batch in (7, 10_000):  # batches that cut across names and lengths; one batch
        monkeypatch.setattr(text, "PROMPT_BATCH", batch)
        clip.text_cache.clear()
        got = text.encode_names(clip, NAMES[::-1]).flip(0)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-6, rtol=0), (batch, (got - expected).abs().max())
