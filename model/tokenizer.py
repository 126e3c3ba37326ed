"""Tokenizer loading: the checkpoint's tokenizer.json through the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """``tokenizers.Tokenizer`` from ``path/tokenizer.json`` (or ``path`` itself if it is the file)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json (expected a checkpoint directory holding one)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
        raise ValueError(f"{file}: not a valid tokenizer.json: {exc}") from None
