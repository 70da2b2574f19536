"""Packed, deterministic, resumable batches from token shards.

Each epoch shuffles the documents with a generator seeded by (seed, epoch), appends the
end-of-document token to each, and lays them end to end in one virtual stream (nothing is
copied: only the cumulative lengths in that order are kept). The stream is cut into windows
of L + 1 tokens (window w is stream[w*L : w*L + L + 1]), and the windows are shuffled too:
sample j of the epoch is window `windows[j]` of a second seeded permutation, as Megatron's
shuffle index does. Why both: a document longer than a batch (a 35K-token table of character
codes in the standard library) would otherwise fill many consecutive steps with one file, and
a small global batch then chases that file and forgets the rest (the CPU demo's loss rose by
1.5 nats over 17 such steps). Inputs are a window's first L tokens, labels the next-token
shift (pre-shifted), document ids number the documents inside the window so attention can
stay within a document without padding (``document_mask=False`` leaves them out: attention
then runs causally over the whole packed window, as GPT-style pretraining does). A label that
crosses into the next document is ignored either way.

Samples are dealt to data-parallel ranks only (global batch g holds samples
[g*B*dp, (g+1)*B*dp), rank r takes its B consecutive ones); sequence-parallel ranks of one
data-parallel rank receive the same full sequence and slice it with `shard_sequence`. A
training step takes `accum` consecutive global batches, so step s reads samples
[s*S, (s+1)*S) with S = B*dp*accum whatever dp and accum are, and an epoch ends at a step
boundary (its last windows//S steps' worth of samples; the rest of the windows wait for the
next shuffle). The position (epoch, samples read in it) is the whole state, so a resumed run
continues at the exact next sample, also on another data-parallel degree with the same S
(dp 4 x accum 1 -> dp 2 x accum 2: an elastic shrink reads the very same samples per step).

Every loader verifies the shards against the manifest's SHA-256 when it opens them (cheaply:
a shard unchanged since its last hash is not hashed again, see `shards.StampCache`), because a
shard edited in place would otherwise train silently. `verify_checksum=False` skips the hash
(the size is still checked) for benchmarks and tests that tamper with shards on purpose.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .batch import IGNORE
from .shards import DataError, bytes_per_token, open_dataset

ORDER = "documents+windows"  # what is shuffled; a loader state from another order cannot resume


@dataclass
class LoaderState:
    epoch: int = 0
    batch: int = 0  # global batches consumed in this epoch


class PackedLoader:
    def __init__(self, data_dir: str | os.PathLike, seq_len: int, batch_size: int, *, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, verify_checksum: bool = True, document_mask: bool = True,
                 accum: int = 1):
        if seq_len < 1 or batch_size < 1 or accum < 1:
            raise DataError(f"seq_len ({seq_len}), batch_size ({batch_size}) and accum ({accum}) must be positive")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside dp_size {dp_size}")
        self.manifest, self.shards = open_dataset(data_dir, verify_checksum)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.document_mask = document_mask
        self.eos = int(self.manifest["tokenizer"]["eos_id"])
        self.bytes_per_token = bytes_per_token(self.manifest)  # None: not recorded by `prepare`
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        # global document table: (shard, index in shard), length including the end token
        self._doc_shard = np.concatenate([np.full(s.documents, i, np.int32) for i, s in enumerate(self.shards)])
        self._doc_index = np.concatenate([np.arange(s.documents, dtype=np.int64) for s in self.shards])
        self._doc_len = np.concatenate([np.diff(s.offsets) for s in self.shards]) + 1
        self.windows_per_epoch = (int(self._doc_len.sum()) - 1) // seq_len
        self.step_samples = batch_size * dp_size * accum  # samples of one training step, every rank's
        self.batches_per_epoch = self.windows_per_epoch // self.step_samples * accum  # whole steps only
        if self.batches_per_epoch == 0:
            raise DataError(f"the dataset has {int(self._doc_len.sum())} tokens: not enough for one global batch "
                            f"of {dp_size} x {batch_size}" + (f" x {accum} (dp x batch_size x grad_accum)" if accum > 1
                                                               else "") +
                            f" sequences of {seq_len} tokens; add data or shrink them")
        self.state = LoaderState()
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------ order
    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, cumulative lengths in that order, window order) of `epoch`."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(len(self._doc_len))
            ends = np.cumsum(self._doc_len[perm])
            windows = rng.permutation(self.windows_per_epoch)
            self._epoch_cache = (epoch, perm, ends, windows)
        return self._epoch_cache[1:]

    def _segments(self, epoch: int, j: int) -> list[tuple[int, int, int]]:
        """(document, first, stop) offsets inside each document that sample j of `epoch` covers,
        in order: its L + 1 tokens, read from the cumulative lengths alone."""
        perm, ends, windows = self._order(epoch)
        w = int(windows[j])
        start, stop = w * self.seq_len, w * self.seq_len + self.seq_len + 1
        d, pos, out = int(np.searchsorted(ends, start, side="right")), start, []
        while pos < stop:
            doc = int(perm[d])
            doc_start = int(ends[d] - self._doc_len[doc])
            hi = min(stop, int(ends[d]))
            out.append((doc, pos - doc_start, hi - doc_start))
            pos, d = hi, d + 1
        return out

    def _window(self, epoch: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [L+1] and document numbers [L+1] of sample j of `epoch`."""
        toks, docs = [], []
        for n, (doc, lo, hi) in enumerate(self._segments(epoch, j)):
            body = self.shards[self._doc_shard[doc]].document(int(self._doc_index[doc]))
            toks.append(np.append(body.astype(np.int64), self.eos)[lo:hi])
            docs.append(np.full(hi - lo, n, np.int64))
        return np.concatenate(toks), np.concatenate(docs)

    def document_lengths(self, epoch: int, j: int) -> list[int]:
        """Lengths of the documents (pieces of them) in sample j's L input tokens, in order: what
        attention within documents sees, without reading a token."""
        lengths = [hi - lo for _, lo, hi in self._segments(epoch, j)]
        lengths[-1] -= 1  # the window's last token is only a label
        return [n for n in lengths if n > 0]

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
        if not self.document_mask:  # attention runs over the packed stream as if it were one text
            return {"input_ids": t[:, :-1], "labels": labels}
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
        return {**asdict(self.state), "samples": self.state.batch * self.batch_size * self.dp_size,
                "step_samples": self.step_samples, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.batch_size * self.dp_size, "order": ORDER}

    def load_state_dict(self, sd: dict) -> None:
        """Resume at the next sample. The sequence length and the samples of a training step
        (dp x batch_size x grad_accum) must be the ones the state was saved with; how they split
        into data-parallel ranks and micro-batches may change."""
        if "step_samples" in sd:
            saved, mine, what = sd["step_samples"], self.step_samples, "samples per step (dp x batch_size x grad_accum)"
        else:  # saved before steps were counted in samples: the global batch of one micro-batch
            saved, mine, what = sd["global_batch"], self.batch_size * self.dp_size, "global batch"
        if (sd["seq_len"], saved) != (self.seq_len, mine):
            raise DataError(f"loader state was saved with seq_len={sd['seq_len']} and {saved} {what}, this run uses "
                            f"{self.seq_len} and {mine}")
        if sd.get("order", "documents") != ORDER:
            raise DataError(f"loader state was saved with the older {sd.get('order', 'documents')!r} sample order "
                            f"(this version shuffles {ORDER!r}); resuming would repeat and skip samples: start a "
                            "new run (checkpoint.init_from = the old checkpoints folder keeps the weights)")
        if sd["seed"] != self.seed:
            raise DataError(f"loader state was saved with seed {sd['seed']}, this run uses {self.seed}")
        batch = int(sd["batch"])
        if "samples" in sd:  # a step boundary: a whole number of this layout's global batches
            batch, rest = divmod(int(sd["samples"]), self.batch_size * self.dp_size)
            if rest:
                raise DataError(f"loader state is {sd['samples']} samples into epoch {sd['epoch']}, not a whole "
                                f"number of global batches of {self.batch_size * self.dp_size}")
        self.state = LoaderState(int(sd["epoch"]), batch)
