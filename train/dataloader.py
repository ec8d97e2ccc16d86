"""BOS-aligned, best-fit packed batches from the prepared parquet shards.

Every row of a batch starts with a document's BOS token and is filled completely (no padding):
the longest buffered document that still fits goes next; when none fits, the shortest one is
cropped to fill the row and its tail dropped (as in autoresearch). Documents are tokenized on the
fly with tiktoken's threaded batch encoder.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from train.prepare import DataError, default_cache_dir, load_manifest
from train.sources import read_texts
from train.tokenizer import Tokenizer

ENCODE_BATCH = 128  # documents per tiktoken batch call
DEFAULT_BUFFER = 1000  # documents kept for best-fit choices (autoresearch's size)


def _documents(paths: list[Path]) -> Iterator[str]:
    """The shards' documents in order, cycling forever; ``DataError`` if a whole pass finds none."""
    while True:
        found = False
        try:
            for text in read_texts(paths):
                found = True
                yield text
        except DataError as exc:
            raise DataError(f"{exc}: run `python -m train.prepare --force`") from None
        if not found:
            raise DataError(f"no documents in {', '.join(p.name for p in paths)}: "
                            "run `python -m train.prepare --force`")


class _DocBuffer:
    """Tokenized documents kept sorted by length, so best-fit is a binary search, not a scan."""

    def __init__(self, texts: Iterator[str], tokenizer: Tokenizer, capacity: int, size: int) -> None:
        self._texts = texts
        self._tokenizer = tokenizer
        # A document longer than a row can only ever be cropped, and a crop uses at most `capacity`
        # tokens; keeping `capacity + 1` preserves "does not fit" while bounding memory.
        self._keep = capacity + 1
        self._size = size
        self._keys: list[tuple[int, int]] = []  # (length, arrival number), sorted
        self._docs: dict[int, np.ndarray] = {}
        self._arrivals = itertools.count()
        self._threads = min(8, os.cpu_count() or 1)

    def _refill(self) -> None:
        texts = list(itertools.islice(self._texts, ENCODE_BATCH))
        bos = self._tokenizer.bos_token_id
        for ids in self._tokenizer.encoding.encode_ordinary_batch(texts, num_threads=self._threads):
            doc = np.empty(min(len(ids) + 1, self._keep), dtype=np.int64)
            doc[0] = bos
            doc[1:] = ids[: len(doc) - 1]
            n = next(self._arrivals)
            self._docs[n] = doc
            bisect.insort(self._keys, (len(doc), n))

    def take(self, room: int) -> np.ndarray:
        """The longest document of length <= ``room`` (oldest among equals), else the shortest cropped."""
        while len(self._keys) < self._size:
            self._refill()
        i = bisect.bisect_right(self._keys, (room, float("inf"))) - 1
        if i >= 0:
            length = self._keys[i][0]
            i = bisect.bisect_left(self._keys, (length, -1))
            return self._docs.pop(self._keys.pop(i)[1])
        return self._docs.pop(self._keys.pop(0)[1])[:room]


def make_batches(cache_dir: Path | str | None, tokenizer: Tokenizer, *, split: str, batch_size: int,
                 seq_len: int, device: torch.device | str = "cpu",
                 buffer_size: int = DEFAULT_BUFFER) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(inputs, targets)`` int64 ``[batch_size, seq_len]`` batches; targets are inputs shifted by one.

    Args:
        cache_dir: a prepared cache (``default_cache_dir()`` when None).
        tokenizer: the cache's tokenizer.
        split: ``"train"`` (training shards, cycled) or ``"val"`` (the pinned shard; a fresh
            iterator always yields the same batches).
        batch_size: rows per batch.
        seq_len: tokens per row.
        device: where the tensors go (pinned, non-blocking copies for CUDA).
        buffer_size: documents kept for best-fit packing.

    Raises:
        DataError: the cache is missing or incomplete, or a shard is empty or corrupt (on first use).
        ValueError: bad split or sizes.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if batch_size < 1 or seq_len < 1 or buffer_size < 1:
        raise ValueError("batch_size, seq_len and buffer_size must be positive")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    manifest = load_manifest(cache)
    if manifest["n_vocab"] != tokenizer.n_vocab:
        raise DataError(f"the tokenizer does not match the data in {cache}: load it with "
                        "Tokenizer.from_directory(cache_dir)")
    names = manifest["train_shards"] if split == "train" else [manifest["val_shard"]]
    return _batches([cache / n for n in names], tokenizer, batch_size, seq_len, torch.device(device), buffer_size)


def _batches(paths: list[Path], tokenizer: Tokenizer, batch_size: int, seq_len: int, device: torch.device,
             buffer_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    capacity = seq_len + 1  # one extra token so targets can be the inputs shifted by one
    buffer = _DocBuffer(_documents(paths), tokenizer, capacity, buffer_size)
    pin = device.type == "cuda"
    while True:
        rows = np.empty((batch_size, capacity), dtype=np.int64)
        for row in rows:
            pos = 0
            while pos < capacity:
                doc = buffer.take(capacity - pos)
                row[pos : pos + len(doc)] = doc
                pos += len(doc)
        batch = torch.from_numpy(rows)
        if pin:
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=pin)
        yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
