"""Packed, deterministic, resumable batches from token shards.

Each epoch shuffles the documents with a generator seeded by (seed, epoch), appends the
end-of-document token to each, and lays them end to end in one virtual stream (nothing is
copied: only the cumulative lengths in that order are kept). Sample j of the epoch is the
window stream[j*L : j*L + L + 1]: inputs are its first L tokens, labels the next-token shift
(pre-shifted), document ids number the documents inside the window so attention can stay
within a document without padding. A label that crosses into the next document is ignored.

Samples are dealt to data-parallel ranks only (global batch g holds samples
[g*B*dp, (g+1)*B*dp), rank r takes its B consecutive ones); sequence-parallel ranks of one
data-parallel rank receive the same full sequence and slice it with `shard_sequence`.
The position (epoch, batch) is the whole state, so a resumed run continues at the exact next
sample.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .shards import DataError, open_dataset

IGNORE = -100


@dataclass
class LoaderState:
    epoch: int = 0
    batch: int = 0  # global batches consumed in this epoch


class PackedLoader:
    def __init__(self, data_dir: str | os.PathLike, seq_len: int, batch_size: int, *, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, verify_checksum: bool = False):
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside dp_size {dp_size}")
        self.manifest, self.shards = open_dataset(data_dir, verify_checksum)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.eos = int(self.manifest["tokenizer"]["eos_id"])
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        # global document table: (shard, index in shard), length including the end token
        self._doc_shard = np.concatenate([np.full(s.documents, i, np.int32) for i, s in enumerate(self.shards)])
        self._doc_index = np.concatenate([np.arange(s.documents, dtype=np.int64) for s in self.shards])
        self._doc_len = np.concatenate([np.diff(s.offsets) for s in self.shards]) + 1
        per_epoch = (int(self._doc_len.sum()) - 1) // seq_len
        self.batches_per_epoch = per_epoch // (batch_size * dp_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"the dataset has {int(self._doc_len.sum())} tokens: not enough for one global batch "
                            f"of {dp_size} x {batch_size} sequences of {seq_len} tokens; add data or shrink them")
        self.state = LoaderState()
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------ order
    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(len(self._doc_len))
            ends = np.cumsum(self._doc_len[perm])
            self._epoch_cache = (epoch, perm, ends)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _window(self, epoch: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [L+1] and document numbers [L+1] of sample j of `epoch`."""
        perm, ends = self._order(epoch)
        start, stop = j * self.seq_len, j * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(ends, start, side="right"))
        toks, docs, pos, d = [], [], start, first
        while pos < stop:
            doc = perm[d]
            doc_start = int(ends[d] - self._doc_len[doc])
            body = self.shards[self._doc_shard[doc]].document(int(self._doc_index[doc]))
            seg = np.append(body.astype(np.int64), self.eos)[pos - doc_start: stop - doc_start]
            toks.append(seg)
            docs.append(np.full(len(seg), d - first, np.int64))
            pos += len(seg)
            d += 1
        return np.concatenate(toks), np.concatenate(docs)

    # ------------------------------------------------------------ batches
    def sample_ids(self, batch: int) -> range:
        """Indices (within the epoch) of this rank's samples in global batch `batch`."""
        base = (batch * self.dp_size + self.dp_rank) * self.batch_size
        return range(base, base + self.batch_size)

    def batch_at(self, epoch: int, batch: int) -> dict[str, torch.Tensor]:
        toks, docs = zip(*(self._window(epoch, j) for j in self.sample_ids(batch)))
        t, d = torch.from_numpy(np.stack(toks)), torch.from_numpy(np.stack(docs))
        labels = t[:, 1:].clone()
        labels[d[:, 1:] != d[:, :-1]] = IGNORE  # never predict across a document boundary
        return {"input_ids": t[:, :-1], "labels": labels, "doc_ids": d[:, :-1]}

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.state.batch >= self.batches_per_epoch:
            self.state = LoaderState(self.state.epoch + 1, 0)
        out = self.batch_at(self.state.epoch, self.state.batch)
        self.state = LoaderState(self.state.epoch, self.state.batch + 1)
        return out

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {**asdict(self.state), "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.batch_size * self.dp_size}

    def load_state_dict(self, sd: dict) -> None:
        """Resume at the next sample. The global batch and sequence length must be the ones the
        state was saved with (the data-parallel degree may change)."""
        if (sd["seq_len"], sd["global_batch"]) != (self.seq_len, self.batch_size * self.dp_size):
            raise DataError(f"loader state was saved with seq_len={sd['seq_len']} and global batch "
                            f"{sd['global_batch']}, this run uses {self.seq_len} and {self.batch_size * self.dp_size}")
        if sd["seed"] != self.seed:
            raise DataError(f"loader state was saved with seed {sd['seed']}, this run uses {self.seed}")
        self.state = LoaderState(int(sd["epoch"]), int(sd["batch"]))
