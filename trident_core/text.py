"""Text embeddings of class names (S1): 80 OpenAI ImageNet prompts per name, each normalised, averaged, normalised.

The prompts run through CLIP's text tower in batches of similar length, each trimmed to its longest prompt: CLIP's
text mask is causal and pooling takes the end-of-text token, so trimming the padding gives the same embeddings for
less work (a fifth less for voc21's names than batches in the names' order).
Embeddings are cached on the model per name, so asking again for the same names costs nothing, and on disk
when the model has a `disk_cache` folder (the command line's), so a later run does not encode them again."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import text_cache
from .classes import ClassList, ClassListError
from .models import ClipModel

PROMPT_BATCH = 640
NameProgress = Callable[[int, int], None]


def check_length(clip: ClipModel, names: list[str]) -> None:
    """Refuse names whose longest prompt would be cut at CLIP's context length."""
    longest = max(clip.templates(), key=lambda t: clip.token_count(t("x")))
    for name in names:
        n = clip.token_count(longest(name))
        if n > clip.context_length:
            raise ClassListError(f"class name {name[:60]!r}... is too long: its prompts need {n} tokens, CLIP takes "
                                 f"{clip.context_length}. Use a shorter name.")


def _tokens(clip: ClipModel, prompts: list[str]) -> torch.Tensor:
    """Token ids [P, L] of the prompts, L the longest prompt's length (CLIP pads every prompt to 77 tokens; the
    result keeps only the columns some prompt uses)."""
    chunks = [clip.tokenize(prompts[i:i + PROMPT_BATCH]) for i in range(0, len(prompts), PROMPT_BATCH)]
    length = max(int(c.argmax(dim=-1).max()) + 1 for c in chunks)  # the end-of-text token has the largest id
    return torch.cat([c[:, :length] for c in chunks])


@torch.no_grad()
def encode_names(clip: ClipModel, names: list[str], on_progress: NameProgress | None = None,
                 after_block: Callable[[nn.Module], object] | None = None) -> torch.Tensor:
    """Embeddings [len(names), E] (float32, L2-normalised), from the model's cache where present.

    `on_progress(done, total)` is called after each batch with the number of names encoded so far (847 names x 80
    prompts take minutes on a CPU). `after_block` gets each block of the text tower once it has run, in every
    batch (`residency.releaser()`: one block's weights resident at a time)."""
    todo = [n for n in dict.fromkeys(names) if n not in clip.text_cache]
    if todo:
        check_length(clip, todo)
        tmpl = clip.templates()
        disk = None if clip.disk_cache is None else text_cache.cache_file(
            clip.disk_cache, clip.path, todo, tmpl, clip.text_dtype, clip.device.type, clip.quick_gelu)
        emb = None if disk is None else text_cache.load(disk, todo, clip.embed_dim)
        if emb is None:
            tokens = _tokens(clip, [t(n) for n in todo for t in tmpl])
            order = torch.argsort(tokens.argmax(dim=-1), stable=True)  # by length: batches trimmed shorter
            feats = torch.empty(len(tokens), clip.embed_dim, device=clip.device)
            for i in range(0, len(tokens), PROMPT_BATCH):
                idx = order[i:i + PROMPT_BATCH]
                feats[idx.to(clip.device)] = clip.encode_prompts(tokens[idx], after_block).float()
                if on_progress is not None:
                    on_progress(min(len(todo), (i + PROMPT_BATCH) // len(tmpl)), len(todo))
            per_prompt = F.normalize(feats, dim=-1).view(len(todo), len(tmpl), -1)
            emb = F.normalize(per_prompt.mean(dim=1), dim=-1)
            if disk is not None:
                text_cache.save(disk, todo, emb)
        for n, e in zip(todo, emb.cpu()):  # kept on the CPU: the cache pins no accelerator memory
            clip.text_cache[n] = e
    return torch.stack([clip.text_cache[n] for n in names])


@torch.no_grad()
def encode_classes(clip: ClipModel, classes: ClassList, on_progress: NameProgress | None = None,
                   after_block: Callable[[nn.Module], object] | None = None) -> torch.Tensor:
    """Embeddings of every query of a class list, [queries, E] (`after_block` as `encode_names` has it)."""
    return encode_names(clip, classes.queries, on_progress, after_block)
