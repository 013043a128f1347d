"""CLIP tokenizer files, written by hand: for the shipped single-file configs and for the test models.

Real SD folders ship `tokenizer/` (and SDXL `tokenizer_2/`) as a CLIPTokenizer: `vocab.json`,
`merges.txt` and a `tokenizer_config.json`. The shipped configs derive the real 49,408-token
vocabulary from CLIP's BPE merges (shipped compressed, 0.5 MB); the test models pass a tiny
vocabulary of their own. Both go through `write_clip_tokenizer`, so they are read the same way.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from diffusiond.pipeline.errors import ConfigError

MERGES_FILE = Path(__file__).parent / "configs" / "clip-merges.txt.bz2"
MERGES_SHA256 = "d308b7377a8ceaa9707a21614fe8c831b9196e197b7aeb69833359362907af02"
"""sha256 of the decompressed merges: a damaged install is reported, not turned into a wrong tokenizer."""

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
OPENCLIP_PAD = "!"
"""OpenCLIP (SD 2, SDXL's second encoder) pads with token 0, which is "!"; CLIP ViT-L pads with EOS."""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte-level alphabet: each of the 256 bytes maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@functools.cache
def clip_merges() -> tuple[str, ...]:
    """The 48,894 BPE merges of the CLIP tokenizer, from the shipped compressed file."""
    try:
        data = bz2.decompress(MERGES_FILE.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the shipped CLIP merges {MERGES_FILE}: {exc}", fix="reinstall diffusiond"
        ) from exc
    if hashlib.sha256(data).hexdigest() != MERGES_SHA256:
        raise ConfigError(f"the shipped CLIP merges {MERGES_FILE} are damaged", fix="reinstall diffusiond")
    return tuple(data.decode("utf-8").splitlines())


def clip_vocab() -> dict[str, int]:
    """CLIP's vocabulary as its SimpleTokenizer builds it: bytes, bytes + `</w>`, one per merge, BOS, EOS."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    tokens += [merge.replace(" ", "") for merge in clip_merges()]
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}


def write_vocab_files(
    folder: Path, *, vocab: Mapping[str, int] | None = None, merges: Sequence[str] | None = None
) -> None:
    """`vocab.json` and `merges.txt` (the real CLIP ones by default), beside a tokenizer config already there."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab() if vocab is None else vocab
    merges = clip_merges() if merges is None else merges
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def write_clip_tokenizer(
    folder: Path,
    *,
    vocab: Mapping[str, int] | None = None,
    merges: Sequence[str] | None = None,
    pad_token: str = EOS,
) -> None:
    """A complete CLIPTokenizer folder that any transformers version reads.

    `vocab` and `merges` default to the real CLIP ones (49,408 tokens). `pad_token`: EOS for
    CLIP ViT-L (SD 1, SDXL `tokenizer`), OPENCLIP_PAD for SD 2 and SDXL `tokenizer_2`. Written
    over whatever is in `folder` (transformers 5's `save_pretrained` records load-time flags
    such as `local_files_only` in the config).
    """
    folder = Path(folder)
    write_vocab_files(folder, vocab=vocab, merges=merges)
    config = {
        "add_prefix_space": False,
        "bos_token": BOS,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        # Without an explicit 77, hand-made CLIP tokenizers get a huge default and tokenizing
        # fails with "int too big to convert".
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
