"""Tokenizer: rustbpe-trained BPE used through tiktoken, its BOS token and its token_bytes table."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from train.prepare import DataError
from train.tokenizer import BOS_TOKEN, SPECIAL_TOKENS, Tokenizer, check_round_trip, train_encoding

TEXTS = [
    "",
    "hello world",
    "def f(x):\n    return x ** 2\r\n",
    "naïve café, Größe: 日本語 σ → 😀",
    "\t\t  trailing spaces   \n\n\n",
    "numbers 1234567890 and 3.14159",
    "<|bos|> is plain text here",
    "\x00\x01 control \u200b zero-width",
]


@pytest.fixture(scope="module")
def tokenizer(prepared_cache: Path) -> Tokenizer:
    return Tokenizer.from_directory(prepared_cache)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, prepend_bos=True)) == BOS_TOKEN + text


def test_tokenizer_bos_is_a_special_token(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("x", prepend_bos=True)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in tokenizer.encode(BOS_TOKEN)  # the string never becomes the token
    assert tokenizer.n_vocab == 512
    assert tokenizer.bos_token_id == tokenizer.n_vocab - len(SPECIAL_TOKENS)


def test_tokenizer_encode_batch_matches_encode(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode_batch(TEXTS, prepend_bos=True) == [tokenizer.encode(t, prepend_bos=True) for t in TEXTS]


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_sum_to_utf8_length(tokenizer: Tokenizer, text: str) -> None:
    table = tokenizer.token_bytes()
    ids = torch.tensor(tokenizer.encode(text, prepend_bos=True), dtype=torch.long)
    assert int(table[ids].sum()) == len(text.encode("utf-8"))


@pytest.mark.parametrize(("token", "size"), [(b"a", 1), (b" ", 1), ("é".encode(), 2), ("😀".encode()[:1], 1)])
def test_token_bytes_on_single_tokens(tokenizer: Tokenizer, token: bytes, size: int) -> None:
    token_id = tokenizer.encoding.encode_single_token(token)
    assert int(tokenizer.token_bytes()[token_id]) == size


def test_token_bytes_table_shape_and_specials(tokenizer: Tokenizer) -> None:
    table = tokenizer.token_bytes()
    assert table.dtype == torch.int32 and table.shape == (tokenizer.n_vocab,)
    special_ids = [tokenizer.encoding.encode_single_token(s) for s in SPECIAL_TOKENS]
    assert table[special_ids].tolist() == [0] * len(SPECIAL_TOKENS)
    assert bool((table[: special_ids[0]] >= 1).all())
    # The saved table equals the one computed from the encoding.
    assert torch.equal(table, Tokenizer(tokenizer.encoding).token_bytes())


def test_train_encoding_learns_requested_vocab() -> None:
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "naïve café " * 30] * 5
    encoding = train_encoding(iter(texts), 300)
    assert encoding.n_vocab == 300
    assert len(encoding.encode_ordinary("the quick brown fox")) < len(b"the quick brown fox")
    check_round_trip(encoding, texts)


def test_train_encoding_rejects_tiny_vocab() -> None:
    with pytest.raises(ValueError, match="at least"):
        train_encoding(iter(["abc"]), 100)


def test_tokenizer_from_directory_accepts_tokenizer_dir(prepared_cache: Path, tokenizer: Tokenizer) -> None:
    direct = Tokenizer.from_directory(prepared_cache / "tokenizer")
    assert direct.encode("naïve café") == tokenizer.encode("naïve café")


@pytest.mark.parametrize("damage", ["missing_pkl", "garbage_pkl", "missing_table", "wrong_table"])
def test_tokenizer_from_directory_damaged_raises_data_error(prepared_cache: Path, tmp_path: Path,
                                                            damage: str) -> None:
    folder = shutil.copytree(prepared_cache / "tokenizer", tmp_path / "tokenizer")
    if damage == "missing_pkl":
        (folder / "tokenizer.pkl").unlink()
    elif damage == "garbage_pkl":
        (folder / "tokenizer.pkl").write_bytes(b"not a pickle")
    elif damage == "missing_table":
        (folder / "token_bytes.pt").unlink()
    else:
        torch.save(torch.zeros(3, dtype=torch.int32), folder / "token_bytes.pt")
    with pytest.raises(DataError, match="train.prepare") as info:
        Tokenizer.from_directory(folder)
    assert "\n" not in str(info.value)
