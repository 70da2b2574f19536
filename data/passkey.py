"""Synthetic passkey retrieval: does long-range attention really work across shards?

Each sample is one sequence of exactly `seq_len` byte tokens: filler sentences, the line
"The pass key is NNNNN. Remember it." at a depth drawn uniformly over the whole context, and
at the very end "What is the pass key? The pass key is NNNNN". Only the answer digits carry
labels, so the loss measures retrieval alone and chance is 1 in 10 per digit. Samples are a
pure function of (seed, index): the task needs no files, is identical on every layout, and
held-out samples (another seed) never overlap with training ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .batch import IGNORE

FILLER = (b"The grass is green. The sky is blue. The sun is yellow. Here we go. "
          b"There and back again. ")
QUESTION = b" What is the pass key? The pass key is "


@dataclass
class PasskeyState:
    batch: int = 0


class PasskeyTask:
    vocab_size = 258  # byte tokenizer (+ end and pad ids)

    def __init__(self, seq_len: int, batch_size: int, *, digits: int = 5, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1):
        self.seq_len, self.batch_size, self.digits, self.seed = seq_len, batch_size, digits, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.answer_len = digits
        need = len(QUESTION) + 2 * digits + 64
        if seq_len < need:
            raise ValueError(f"passkey needs seq_len >= {need} to fit the question and the key")
        self.state = PasskeyState()

    def sample(self, index: int) -> tuple[np.ndarray, int, str]:
        """(tokens [seq_len + 1], depth of the key, key) of sample `index`."""
        rng = np.random.default_rng([self.seed, index])
        key = "".join(str(d) for d in rng.integers(0, 10, self.digits))
        needle = f" The pass key is {key}. Remember it. ".encode()
        tail = QUESTION + key.encode()
        body_len = self.seq_len + 1 - len(tail)
        filler = (FILLER * (body_len // len(FILLER) + 2))
        offset = int(rng.integers(0, len(FILLER)))
        body = bytearray(filler[offset: offset + body_len - len(needle)])
        depth = int(rng.integers(0, len(body) + 1))
        body[depth:depth] = needle
        tokens = np.frombuffer(bytes(body) + tail, dtype=np.uint8).astype(np.int64)
        return tokens, depth, key

    def batch_at(self, batch: int) -> dict[str, torch.Tensor]:
        base = (batch * self.dp_size + self.dp_rank) * self.batch_size
        toks = torch.from_numpy(np.stack([self.sample(base + i)[0] for i in range(self.batch_size)]))
        labels = torch.full((self.batch_size, self.seq_len), IGNORE, dtype=torch.long)
        labels[:, -self.digits:] = toks[:, -self.digits:]
        return {"input_ids": toks[:, :-1], "labels": labels,
                "doc_ids": torch.zeros(self.batch_size, self.seq_len, dtype=torch.long)}

    def next_batch(self) -> dict[str, torch.Tensor]:
        out = self.batch_at(self.state.batch)
        self.state = PasskeyState(self.state.batch + 1)
        return out

    def state_dict(self) -> dict:
        return {**asdict(self.state), "samples": self.state.batch * self.batch_size * self.dp_size,
                "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, sd: dict) -> None:
        per_batch = self.batch_size * self.dp_size  # another data-parallel degree continues at the same sample
        self.state = PasskeyState(int(sd["samples"]) // per_batch if "samples" in sd else int(sd["batch"]))
