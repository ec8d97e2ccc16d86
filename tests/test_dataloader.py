"""make_batches: BOS-aligned best-fit packing, shifted targets, cycling, determinism, bad data."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch

from train.dataloader import _DocBuffer, make_batches
from train.prepare import DataError, load_manifest
from train.sources import read_texts
from train.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(prepared_cache: Path) -> Tokenizer:
    return Tokenizer.from_directory(prepared_cache)


def _documents(cache: Path, tokenizer: Tokenizer, split: str) -> list[list[int]]:
    manifest = load_manifest(cache)
    names = manifest["train_shards"] if split == "train" else [manifest["val_shard"]]
    return tokenizer.encode_batch(list(read_texts([cache / n for n in names])), prepend_bos=True)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize(("batch_size", "seq_len"), [(1, 8), (4, 64), (3, 300)])
def test_make_batches_rows_are_bos_aligned_packed_documents(prepared_cache: Path, tokenizer: Tokenizer,
                                                            split: str, batch_size: int, seq_len: int) -> None:
    docs = {tuple(d) for d in _documents(prepared_cache, tokenizer, split)}
    bos = tokenizer.bos_token_id
    for x, y in itertools.islice(make_batches(prepared_cache, tokenizer, split=split, batch_size=batch_size,
                                              seq_len=seq_len), 5):
        assert x.shape == y.shape == (batch_size, seq_len) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        assert bool((x[:, 0] == bos).all())
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
            # Whole documents, except the last piece, which may be a crop (no padding anywhere).
            assert all(p in docs for p in pieces[:-1])
            assert any(d[: len(pieces[-1])] == pieces[-1] for d in docs)


def test_make_batches_val_is_deterministic(prepared_cache: Path, tokenizer: Tokenizer) -> None:
    def first(n: int) -> list[torch.Tensor]:
        batches = make_batches(prepared_cache, tokenizer, split="val", batch_size=2, seq_len=32)
        return [x for x, _ in itertools.islice(batches, n)]

    one, two = first(4), first(4)
    assert len(one) == 4 and all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_make_batches_train_cycles_past_one_epoch(prepared_cache: Path, tokenizer: Tokenizer) -> None:
    epoch_tokens = sum(len(d) for d in _documents(prepared_cache, tokenizer, "train"))
    batches = make_batches(prepared_cache, tokenizer, split="train", batch_size=8, seq_len=64, buffer_size=16)
    steps = 3 * epoch_tokens // (8 * 65) + 1
    assert sum(1 for _ in itertools.islice(batches, steps)) == steps


def test_make_batches_never_reads_val_for_training(prepared_cache: Path, tokenizer: Tokenizer) -> None:
    val_only = {tuple(d) for d in _documents(prepared_cache, tokenizer, "val")}
    val_only -= {tuple(d) for d in _documents(prepared_cache, tokenizer, "train")}
    batches = make_batches(prepared_cache, tokenizer, split="train", batch_size=4, seq_len=512, buffer_size=8)
    seen = str([row for x, _ in itertools.islice(batches, 20) for row in x.tolist()])
    assert val_only and not any(str(list(d))[1:-1] in seen for d in val_only)


def test_doc_buffer_takes_longest_fit_else_crops_shortest(tokenizer: Tokenizer) -> None:
    texts = iter(["a" * 1, "b b b b", "c", "a" * 40] * 100)
    buffer = _DocBuffer(texts, tokenizer, capacity=10, size=4)
    lengths = sorted({len(tokenizer.encode(t, prepend_bos=True)) for t in ["a", "b b b b", "c"]})
    assert len(buffer.take(100)) == 11  # a long document is kept at capacity + 1 tokens
    assert len(buffer.take(lengths[-1])) == lengths[-1]
    cropped = buffer.take(1)
    assert cropped.tolist() == [tokenizer.bos_token_id]


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"split": "test"}, ValueError),
    ({"batch_size": 0}, ValueError),
    ({"seq_len": 0}, ValueError),
])
def test_make_batches_bad_arguments(prepared_cache: Path, tokenizer: Tokenizer, kwargs: dict,
                                    error: type[Exception]) -> None:
    args = {"split": "train", "batch_size": 2, "seq_len": 8, **kwargs}
    with pytest.raises(error):
        make_batches(prepared_cache, tokenizer, **args)


@pytest.mark.parametrize("damage", ["missing_cache", "truncated_shard", "garbage_shard", "empty_val"])
def test_make_batches_bad_data_raises_data_error(prepared_cache: Path, tokenizer: Tokenizer, tmp_path: Path,
                                                 damage: str) -> None:
    cache = shutil.copytree(prepared_cache, tmp_path / "cache")
    shard = cache / ("data/val.parquet" if damage == "empty_val" else "data/shard_00000.parquet")
    split = "val" if damage == "empty_val" else "train"
    if damage == "missing_cache":
        shutil.rmtree(cache)
    elif damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "garbage_shard":  # same size, so only reading it can tell
        shard.write_bytes(b"\0" * shard.stat().st_size)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": pa.array([""], pa.string())}), shard)
        _match_manifest_size(cache, "data/val.parquet")
    with pytest.raises(DataError, match="train.prepare") as info:
        next(make_batches(cache, tokenizer, split=split, batch_size=2, seq_len=16))
    assert "\n" not in str(info.value)


def _match_manifest_size(cache: Path, rel: str) -> None:
    # Simulates damage the cheap size check cannot see (e.g. a shard rewritten by another tool).
    import json

    from train.prepare import _fingerprint

    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["files"][rel]["bytes"] = (cache / rel).stat().st_size
    manifest["fingerprint"] = _fingerprint(manifest["files"])
    (cache / "manifest.json").write_text(json.dumps(manifest))


def test_make_batches_rejects_other_tokenizer(prepared_cache: Path, tmp_path: Path) -> None:
    from train.tokenizer import train_encoding

    other = Tokenizer(train_encoding(iter(["some other text " * 10] * 3), 300))
    with pytest.raises(DataError, match="does not match"):
        make_batches(prepared_cache, other, split="train", batch_size=1, seq_len=8)
