"""BPE tokenizer: trained with rustbpe, used through tiktoken.

The learned merges become a ``tiktoken.Encoding`` (mergeable ranks + special tokens), which encodes
fast and in parallel. On disk it is a plain dict pickle (``pattern``, ``mergeable_ranks``,
``special_tokens``) rather than a pickled ``Encoding`` so that it survives tiktoken upgrades.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken
import torch

from train.sources import DataError

# GPT-4 style split, with numbers grouped by at most two digits (smaller vocabularies waste fewer
# ids on three-digit numbers).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
BOS_TOKEN = "<|bos|>"
# Spare ids kept after BOS so a later format change does not need a new vocabulary.
SPECIAL_TOKENS = (BOS_TOKEN, "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>")
TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"
# Documents are capped for tokenizer training only: a few huge files would otherwise dominate
# the pair counts.
TRAIN_DOC_CHARS = 10_000
ROUND_TRIP_SAMPLE = "Hello world! def f(x):\n\treturn x ** 2  # 123 4567\nnaïve café, Größe, 日本語, σ → 😀\r\n"


def train_encoding(texts: Iterable[str], vocab_size: int) -> tiktoken.Encoding:
    """Train a byte-level BPE on ``texts`` and wrap it as a tiktoken ``Encoding``.

    Args:
        texts: training documents (each capped at ``TRAIN_DOC_CHARS`` characters).
        vocab_size: total vocabulary size, special tokens included.

    Returns:
        The encoding; ids ``0..vocab_size-len(SPECIAL_TOKENS)-1`` are merges, then the specials.
    """
    import rustbpe

    n_merged = vocab_size - len(SPECIAL_TOKENS)
    if n_merged < 256:
        raise ValueError(f"vocab size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator((t[:TRAIN_DOC_CHARS] for t in texts), n_merged, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    return build_encoding(trainer.get_pattern(), ranks)


def build_encoding(pattern: str, mergeable_ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """Build the ``Encoding`` from learned ranks, appending ``SPECIAL_TOKENS`` after them."""
    offset = len(mergeable_ranks)
    specials = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="optuna-triage-bpe", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                             special_tokens=specials)


def token_bytes_table(encoding: tiktoken.Encoding) -> torch.Tensor:
    """Bytes each token id stands for (int32 ``[n_vocab]``), 0 for special tokens.

    Raw token bytes are counted, not the length of a decoded string: a token holding part of a
    multi-byte character would otherwise count as a 3-byte replacement character, and the sum over
    a text's tokens would no longer equal the text's UTF-8 length, which bits-per-byte relies on.
    """
    special_ids = set(encoding._special_tokens.values())
    sizes = [0 if i in special_ids else len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)]
    return torch.tensor(sizes, dtype=torch.int32)


def check_round_trip(encoding: tiktoken.Encoding, samples: Sequence[str] = ()) -> None:
    """Raise ``DataError`` unless every sample (and a fixed unicode sample) decodes back exactly."""
    for text in (ROUND_TRIP_SAMPLE, *samples):
        decoded = encoding.decode(encoding.encode_ordinary(text))
        if decoded != text:
            raise DataError(f"tokenizer round trip failed on {text[:40]!r}: "
                            "rebuild with `python -m train.prepare --force`")


def save_tokenizer(encoding: tiktoken.Encoding, directory: Path) -> list[Path]:
    """Write ``tokenizer.pkl`` and ``token_bytes.pt`` atomically (temp name, then rename).

    Returns:
        The two written paths.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "pattern": encoding._pat_str,
        "mergeable_ranks": dict(encoding._mergeable_ranks),
        "special_tokens": dict(encoding._special_tokens),
    }
    pkl, table = directory / TOKENIZER_FILE, directory / TOKEN_BYTES_FILE
    tmp = pkl.with_name(pkl.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, pkl)
    tmp = table.with_name(table.name + ".tmp")
    torch.save(token_bytes_table(encoding), tmp)
    os.replace(tmp, table)
    return [pkl, table]


def load_encoding(directory: Path) -> tiktoken.Encoding:
    """Read ``tokenizer.pkl`` from ``directory``; ``DataError`` when missing or unreadable."""
    path = Path(directory) / TOKENIZER_FILE
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
        ranks, specials = state["mergeable_ranks"], state["special_tokens"]
        return tiktoken.Encoding(name="optuna-triage-bpe", pat_str=state["pattern"],
                                 mergeable_ranks=ranks, special_tokens=specials)
    except FileNotFoundError:
        raise DataError(f"no tokenizer at {path}: run `python -m train.prepare`") from None
    except Exception as exc:  # any unpickling/format problem means a damaged file
        raise DataError(f"unreadable tokenizer {path} ({type(exc).__name__}): "
                          "run `python -m train.prepare --force`") from None


class Tokenizer:
    """A trained BPE ``Encoding`` with a BOS token, as the dataloader and evaluation use it."""

    def __init__(self, encoding: tiktoken.Encoding, token_bytes: torch.Tensor | None = None) -> None:
        """Wrap ``encoding``; ``token_bytes`` (from disk) is computed from it when not given."""
        self.encoding = encoding
        self.bos_token_id: int = encoding.encode_single_token(BOS_TOKEN)
        self.n_vocab: int = encoding.n_vocab
        self._token_bytes = token_bytes

    @classmethod
    def from_directory(cls, path: Path | str) -> Tokenizer:
        """Load from a tokenizer directory or from a prepared cache directory (``<cache>/tokenizer``)."""
        path = Path(path)
        if not (path / TOKENIZER_FILE).exists() and (path / "tokenizer" / TOKENIZER_FILE).exists():
            path = path / "tokenizer"
        encoding = load_encoding(path)
        table_path = path / TOKEN_BYTES_FILE
        try:
            table = torch.load(table_path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DataError(f"no token_bytes table at {table_path}: run `python -m train.prepare`") from None
        except Exception as exc:
            raise DataError(f"unreadable {table_path} ({type(exc).__name__}): "
                              "run `python -m train.prepare --force`") from None
        if not isinstance(table, torch.Tensor) or table.shape != (encoding.n_vocab,):
            raise DataError(f"{table_path} does not match the tokenizer: run `python -m train.prepare --force`")
        return cls(encoding, table.to(torch.int32))

    def encode(self, text: str, prepend_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token strings in it are treated as plain text)."""
        ids = self.encoding.encode_ordinary(text)
        return [self.bos_token_id, *ids] if prepend_bos else ids

    def encode_batch(self, texts: Sequence[str], prepend_bos: bool = False, num_threads: int = 8) -> list[list[int]]:
        """``encode`` for many texts, in tiktoken's thread pool."""
        batch = self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)
        if prepend_bos:
            for ids in batch:
                ids.insert(0, self.bos_token_id)
        return batch

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 from partial sequences becomes U+FFFD)."""
        return self.encoding.decode(list(ids))

    def token_bytes(self) -> torch.Tensor:
        """int32 ``[n_vocab]``: UTF-8 bytes per token id, 0 for special tokens (for bits per byte)."""
        if self._token_bytes is None:
            self._token_bytes = token_bytes_table(self.encoding)
        return self._token_bytes
