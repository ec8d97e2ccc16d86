"""Shared test fixtures: a tiny deterministic text corpus and a cache prepared from it.

Every test that needs data uses ``prepared_cache`` so nothing ever touches the user's real cache
(``~/.cache/optuna-triage``) and the tokenizer is trained once per test session.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

# Small vocabulary keeps BPE training well under a second on the tiny corpus.
TINY_VOCAB_SIZE = 512
TINY_NUM_DOCS = 120

_WORDS = (
    "the model learns rank weights matrix loss step trial prune optuna gradient token shard "
    "data cache attention value embedding layer head norm rotary window batch sequence train "
    "validation bits byte python def return class import for while if else with yield lambda"
).split()
# A few non-ASCII words so round trips and token_bytes cover multi-byte UTF-8.
_UNICODE = ["naïve", "café", "Größe", "日本語", "données", "σ", "→", "😀"]


def _make_document(rng: random.Random, index: int) -> str:
    """One small document: a few lines of pseudo-code and prose, deterministic from ``rng``."""
    lines = [f"# document {index}"]
    for _ in range(rng.randint(3, 12)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(_UNICODE))
        if rng.random() < 0.4:
            lines.append(f"def {words[0]}_{index}({words[1]}):\n    return {' + '.join(words[2:5])}")
        else:
            lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines) + "\n"


def write_tiny_corpus(folder: Path, num_docs: int = TINY_NUM_DOCS, seed: int = 0) -> Path:
    """Write ``num_docs`` deterministic .txt documents into ``folder`` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(num_docs):
        (folder / f"doc_{i:04d}.txt").write_text(_make_document(rng, i), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of small, deterministic .txt documents (read-only for tests: copy before mutating)."""
    return write_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"))


@pytest.fixture(scope="session")
def prepared_cache(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """A cache dir prepared from ``tiny_corpus`` with a 512-token vocabulary (read-only for tests)."""
    from train.prepare import prepare

    cache = tmp_path_factory.mktemp("prepared_cache")
    prepare(cache, source=str(tiny_corpus), vocab_size=TINY_VOCAB_SIZE, log=lambda *a, **k: None)
    return cache


@pytest.fixture
def one_thread():
    """Run a test's tiny model on one thread.

    Small models gain nothing from a second thread, and OpenMP's spinning threads slow down badly on a busy
    machine. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
