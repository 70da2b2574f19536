"""Tokenizers: a built-in byte-level one (works offline, any text), or a Hugging Face
`tokenizers` file when that optional package is installed."""

from __future__ import annotations

import os
from pathlib import Path

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; 256 ends a document; 257 pads."""

    name: str = "bytes"
    vocab_size: int = 258
    eos_id: int = 256
    pad_id: int = 257

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}


TOKENIZER_LIMIT = 256 << 20  # tokenizer.json files of large vocabularies are tens of MiB


class HFTokenizer:
    """A `tokenizers` JSON file (optional dependency: pip install tokenizers)."""

    def __init__(self, path: str, eos_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError("the 'tokenizers' package is needed for --tokenizer FILE.json "
                               "(pip install tokenizers), or use the built-in byte tokenizer") from e
        from longtrain.files import read_bytes

        from .shards import DataError

        self.path = path
        raw = read_bytes(Path(path), TOKENIZER_LIMIT, DataError)  # a regular file of bounded size, not a FIFO
        try:
            self.tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception types
            raise DataError(f"tokenizer file {path} is not a tokenizers JSON file ({str(e)[:200]}); pass "
                            "--tokenizer bytes or the tokenizer.json of a Hugging Face model") from None
        self.name = f"hf:{path}"
        self.vocab_size = self.tok.get_vocab_size()
        eos = self.tok.token_to_id(eos_token) if eos_token else None
        self.eos_id = eos if eos is not None else self.vocab_size
        if self.eos_id == self.vocab_size:  # no end-of-document token: append one id
            self.vocab_size += 1
        self.pad_id = self.eos_id

    def encode(self, text: str | bytes) -> np.ndarray:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return np.asarray(self.tok.encode(text).ids, dtype=np.uint32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.eos_id])

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}


def load_tokenizer(spec: str | None):
    """'bytes' (default) or a path to a tokenizers JSON file."""
    if spec in (None, "", "bytes"):
        return ByteTokenizer()
    if not os.path.exists(spec):  # something else than a regular file is refused when read
        from .shards import DataError

        raise DataError(f"tokenizer file {spec} not found; pass --tokenizer bytes or the path of a "
                        "tokenizers JSON file (tokenizer.json)")
    return HFTokenizer(spec, _eos_token(spec))


def _eos_token(path: str) -> str | None:
    """The end-of-sequence token a HF tokenizer folder names (tokenizer_config.json, JSON), so
    documents end with the model's own eos id instead of a new one past its vocabulary."""
    from pathlib import Path

    from longtrain.files import read_json

    try:
        eos = read_json(Path(path).parent / "tokenizer_config.json").get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos if isinstance(eos, str) else None
