"""Loading Hugging Face pieces the same way in every component (tokenizer identity, remote code off)."""

from __future__ import annotations

import hashlib
from typing import Any

from opsd.errors import UserInputError


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of an HF id or local directory. Remote code runs only if the user turned it on."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"cannot load a tokenizer from {path!r}: {detail}") from None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short id of a tokenizer's vocabulary and special tokens.

    Stages refuse each other's tables when this differs: token ids from one tokenizer mean nothing to another.
    """
    digest = hashlib.sha256()
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode())
    digest.update(repr(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return digest.hexdigest()[:16]
