"""What a batch is: the contract between the loaders that make batches and the model that reads
them. Imports nothing, so both sides (data/, models/) read the same rule.

A batch is a dict of [batch, seq] long tensors: ``input_ids``, ``labels`` (pre-shifted: label t
is token t+1) and, with document masking, ``doc_ids`` (attention stays inside a document). A
label equal to `IGNORE` is not predicted: it counts neither in the loss nor in its token count.
"""

from __future__ import annotations

IGNORE = -100  # torch's cross_entropy default ignore_index, so the label tensors mean the same there


def labeled(labels):
    """The mask of positions whose label counts (a bool tensor shaped like `labels`)."""
    return labels != IGNORE
