"""Prompts as AUTOMATIC1111 users write them: `(word:1.3)`, `((word))`, `[word]`, `\\(`, `BREAK`, any length.

`parse_attention` is A1111's own parser (modules/prompt_parser.py, `parse_prompt_attention`),
ported line for line: compel has a syntax of its own (`(word)1.3`, `word++`) that reads A1111's
prompts differently, so only compel's embedding side is used. The weighting, and the chunking of
a prompt over 75 tokens into 77-token windows that are concatenated (as A1111 does, split at a
phrase boundary), are compel's `EmbeddingsProvider`; `BREAK` starts a new window, as in A1111.
A prompt with no syntax that fits one window goes to the pipeline as text, exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffusiond.pipeline.job import LORA_TAG

A1111_WINDOW_TOKENS = 75
"""Tokens per 77-token window, between its start and end tokens."""

_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = -1.0
"""The weight `parse_attention` gives a `BREAK` (its text is "BREAK")."""


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A1111's `parse_prompt_attention`: the prompt as (text, weight) runs, `BREAK` as ("BREAK", -1).

    `(a)` multiplies by 1.1, `[a]` by 1/1.1, `(a:1.5)` by 1.5; `\\(` is a literal bracket; an
    unclosed bracket applies to the end; runs of equal weight are merged.
    """
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", BREAK])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(str(t), float(w)) for t, w in res]


def plain_text(text: str) -> str:
    """The prompt without its syntax: what the words are (the pooled SDXL embedding reads this)."""
    return _words_of(parse_attention(text))


def _words_of(parsed: Sequence[tuple[str, float]]) -> str:
    return "".join(" " if w == BREAK else t for t, w in parsed)


@dataclass(frozen=True)
class PromptEncoding:
    """How one job's prompts reached the text encoder (the manifest's `prompt_encoding`)."""

    method: str
    """`text`: given to the pipeline as is; `compel`: A1111 syntax parsed here, embedded by compel."""
    tokens: int
    """Tokens of the longer of prompt and negative prompt (their words, without the syntax)."""
    windows: int
    """77-token windows the text encoder ran over (one unless a prompt is long or has BREAK)."""
    weighted: bool
    """Some part of the prompt or negative prompt has a weight other than 1."""
    truncated: bool = False
    """Part of a prompt was cut (never, where the pipeline takes embeddings)."""

    def record(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "syntax": "a1111",
            "tokens": self.tokens,
            "windows": self.windows,
            "weighted": self.weighted,
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class Encoded:
    """The prompt arguments of one pipeline call, and how each image's prompts were encoded."""

    kwargs: dict[str, Any]
    """`prompt`/`negative_prompt` as text, or the `*_embeds` compel made."""
    encodings: list[PromptEncoding]
    """One per image, in the order the prompts were given."""


def encode(pipe: Any, prompts: Sequence[str], negatives: Sequence[str], *, clip_skip: int = 1) -> Encoded:
    """The texts as they are, or embeddings from compel when any prompt of the call has A1111 syntax
    or is longer than one window (then every image's, padded alike, so one call takes them all).

    `clip_skip` 2 takes the text encoder's next-to-last layer, through compel whatever the prompt:
    diffusers' own `clip_skip` reaches `text_encoder.text_model`, which transformers 5 no longer has."""
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    prompts = [LORA_TAG.sub("", p) for p in prompts]  # `<lora:name:w>` picks a LoRA; it is not text
    negatives = [LORA_TAG.sub("", n) for n in negatives]
    pairs = list(zip(prompts, negatives, strict=True))
    parsed = {text: parse_attention(text) for text in {*prompts, *negatives}}  # once per distinct text
    tokens = {text: _tokens(tokenizer, _words_of(runs)) for text, runs in parsed.items()}
    counts = [(tokens[p], tokens[n]) for p, n in pairs]
    weighted = [any(w not in (1.0, BREAK) for t in pair for _, w in parsed[t]) for pair in pairs]
    plain = clip_skip == 1 and all(
        parsed[t] == [(t, 1.0)] and tokens[t] <= A1111_WINDOW_TOKENS for pair in pairs for t in pair
    )
    if tokenizer is None or plain:
        kwargs: dict[str, Any] = {"prompt": list(prompts), "negative_prompt": list(negatives)}
        windows = [1] * len(pairs)
        method = "text"
    else:
        kwargs, own = _embeddings(pipe, list(prompts), list(negatives), clip_skip)
        windows = [max(own[i], own[len(pairs) + i]) for i in range(len(pairs))]
        method = "compel"
    encodings = [
        PromptEncoding(method, max(c), w, weighted=x) for c, w, x in zip(counts, windows, weighted, strict=True)
    ]
    return Encoded(kwargs, encodings)


def _embeddings(
    pipe: Any, prompts: list[str], negatives: list[str], clip_skip: int
) -> tuple[dict[str, Any], list[int]]:
    """compel's embeddings of every prompt and negative prompt, and each one's own windows (unpadded)."""
    from compel import (  # loads diffusers' pipelines
        EmbeddingsProvider,
        ReturnedEmbeddingsType,
        SplitLongTextMode,
    )

    xl = getattr(pipe, "text_encoder_2", None) is not None
    if xl:
        kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
    elif clip_skip == 2:
        kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED
    else:
        kind = ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
    pairs = [
        (tokenizer, encoder)
        for tokenizer, encoder in (
            (getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
            (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)),
        )
        if encoder is not None
    ]
    device = str(pipe.device)
    providers = [
        EmbeddingsProvider(
            textual_inversion_manager=_TextualInversions(pipe, tokenizer),  # multi-vector embeddings
            tokenizer=tokenizer,
            text_encoder=encoder if hasattr(encoder, "text_model") else _TextModelView(encoder),
            truncate=False,
            returned_embeddings_type=kind,
            device=device,
            split_long_text_mode=SplitLongTextMode.PHRASES,  # A1111 backs up to a comma
            dtype_for_device_getter=lambda _device, dtype=encoder.dtype: dtype,
        )
        for tokenizer, encoder in pairs
    ]
    texts = [*prompts, *negatives]
    with torch.no_grad():
        raw = [[_encode(provider, t, device) for t in texts] for provider in providers]
        own = [max(embeds[i].shape[1] for embeds in raw) // embeds_window(providers[0]) for i in range(len(texts))]
        # Padded to the longest (SDXL: over both encoders), then the encoders' side by side.
        width = max(e.shape[1] for embeds in raw for e in embeds)
        padded = [
            [_pad_to(e, width, provider) for e in embeds] for embeds, provider in zip(raw, providers, strict=True)
        ]
        joined = torch.cat([torch.cat(embeds, dim=0) for embeds in padded], dim=-1)
        out: dict[str, Any] = {
            "prompt_embeds": joined[: len(prompts)],
            "negative_prompt_embeds": joined[len(prompts) :],
        }
        if xl:  # the pooled embedding comes from the second encoder, over the words alone
            pooled = providers[-1].get_pooled_embeddings([plain_text(t) for t in texts], device=device)
            out |= {
                "pooled_prompt_embeds": pooled[: len(prompts)],
                "negative_pooled_prompt_embeds": pooled[len(prompts) :],
            }
    return out, own


class _TextualInversions:
    """compel's hook for multi-vector textual-inversion tokens (`name` -> `name name_1 ...`), for one
    tokenizer: compel's own `DiffusersTextualInversionManager` always uses the pipeline's first one,
    which the SDXL refiner does not have."""

    def __init__(self, pipe: Any, tokenizer: Any) -> None:
        self.pipe, self.tokenizer = pipe, tokenizer

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        if not token_ids or not hasattr(self.pipe, "maybe_convert_prompt"):
            return token_ids
        prompt = self.pipe.maybe_convert_prompt(self.tokenizer.decode(token_ids), self.tokenizer)
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))


class _TextModelView:
    """A CLIP text encoder as compel reaches it: `encoder.text_model.final_layer_norm` (for the
    next-to-last layer, normalised) is `encoder.final_layer_norm` since transformers 5 flattened it."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._encoder(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return self._encoder if name == "text_model" else getattr(self._encoder, name)


def embeds_window(provider: Any) -> int:
    """Tokens per window of the embeddings (77: 75 and the start and end tokens)."""
    return int(provider.empty_z.shape[1])


def _split_breaks(parsed: list[tuple[str, float]]) -> list[list[tuple[str, float]]]:
    parts: list[list[tuple[str, float]]] = [[]]
    for text, weight in parsed:
        if weight == BREAK:
            parts.append([])
        else:
            parts[-1].append((text, weight))
    return [part or [("", 1.0)] for part in parts]


def _encode(provider: Any, text: str, device: str) -> torch.Tensor:
    """[1, 77k, d]: each BREAK-separated part in windows of its own, concatenated."""
    pieces = []
    for part in _split_breaks(parse_attention(text)):
        fragments, weights = [t for t, _ in part], [w for _, w in part]
        pieces.append(
            provider.get_embeddings_for_weighted_prompt_fragments(
                text_batch=[fragments], fragment_weights_batch=[weights], device=device
            )
        )
    return torch.cat(pieces, dim=1)


def _pad_to(embeds: torch.Tensor, width: int, provider: Any) -> torch.Tensor:
    """Windows of the empty prompt appended (as A1111 pads the shorter of prompt and negative)."""
    empty = provider.empty_z.to(embeds.device, embeds.dtype)
    while embeds.shape[1] < width:
        embeds = torch.cat([embeds, empty.expand(embeds.shape[0], -1, -1)], dim=1)
    return embeds


def _tokens(tokenizer: Any, words: str) -> int:
    """Tokens of a prompt's words (its syntax and BREAKs left out), without start and end tokens."""
    if tokenizer is None:
        return 0
    return len(tokenizer(words, add_special_tokens=False, truncation=False).input_ids)
