"""Build the training data once: parquet shards, a pinned validation shard, a BPE tokenizer.

``python -m train.prepare`` turns a source (the interpreter's standard library by default, a user
folder, or autoresearch's ClimbMix shards) into ``<cache>/data/*.parquet`` plus
``<cache>/tokenizer/``, and writes ``<cache>/manifest.json`` last. A cache counts as prepared only
when the manifest exists and every file it lists still has the recorded size (and, when
``prepare`` checks, the recorded sha256): a crash mid-way never leaves a cache that looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NoReturn

import pyarrow as pa
import pyarrow.parquet as pq

from train import tokenizer as tok
from train.sources import (
    CLIMBMIX_DEFAULT_SHARDS,
    CLIMBMIX_URL,
    CLIMBMIX_URL_ENV,
    CLIMBMIX_VAL_INDEX,
    VAL_SHARD,
    DataError,
    download_climbmix,
    folder_documents,
    is_val,
    order_key,
    parquet_rows,
    read_texts,
    stdlib_documents,
)

__all__ = ["DataError", "build_parser", "default_cache_dir", "load_manifest", "main", "prepare"]

CACHE_ENV = "OPTUNA_TRIAGE_CACHE"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_CHARS = 8_000_000  # ~8 MB of text per training shard
TOKENIZER_MAX_CHARS = 1_000_000_000


def default_cache_dir() -> Path:
    """``$OPTUNA_TRIAGE_CACHE`` > ``$XDG_CACHE_HOME/optuna-triage`` > ``~/.cache/optuna-triage``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "optuna-triage"


# ----------------------------------------------------------------------------------- writing
def _write_parquet(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), tmp, row_group_size=1024, compression="zstd")
    os.replace(tmp, path)


def write_shards(docs: list[tuple[str, str]], cache: Path) -> tuple[list[str], list[str]]:
    """Split documents into train/val by key hash and write the shards; returns (train names, val texts)."""
    docs = sorted(docs, key=lambda d: order_key(d[0]))
    val = [text for key, text in docs if is_val(key)]
    train = [text for key, text in docs if not is_val(key)]
    if not val and len(train) > 1:  # tiny sources: still pin one document for validation
        val.append(train.pop())
    if not train or not val:
        raise DataError("the source needs at least 2 documents (one for training, one for validation)")
    names, shard, size = [], [], 0
    for text in train:
        shard.append(text)
        size += len(text)
        if size >= SHARD_CHARS:
            names.append(f"data/shard_{len(names):05d}.parquet")
            _write_parquet(cache / names[-1], shard)
            shard, size = [], 0
    if shard:
        names.append(f"data/shard_{len(names):05d}.parquet")
        _write_parquet(cache / names[-1], shard)
    _write_parquet(cache / VAL_SHARD, val)
    return names, val


# ----------------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(files: dict[str, dict]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def load_manifest(cache_dir: Path | None = None, *, full_check: bool = False) -> dict:
    """The manifest of a complete prepared cache, after checking the files it lists.

    Args:
        cache_dir: the cache; ``default_cache_dir()`` when None.
        full_check: also recompute every file's sha256 (``prepare`` does; loading only checks sizes).

    Raises:
        DataError: nothing prepared there, or a listed file is missing, resized or (full check) altered.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        manifest = json.loads((cache / MANIFEST).read_text())
        files = manifest["files"]
        ok = manifest["format"] == FORMAT_VERSION and manifest["fingerprint"] == _fingerprint(files)
    except FileNotFoundError:
        raise DataError(f"no prepared data in {cache}: run `python -m train.prepare`") from None
    except (ValueError, KeyError, TypeError, OSError):
        ok = False
    if not ok:
        raise DataError(f"{cache / MANIFEST} is damaged: run `python -m train.prepare --force`")
    for rel, record in files.items():
        path = cache / rel
        intact = path.is_file() and path.stat().st_size == record["bytes"]
        if not intact or (full_check and _sha256(path) != record["sha256"]):
            raise DataError(f"prepared data in {cache} is incomplete or damaged ({rel}): run `python -m train.prepare`")
    return manifest


def _write_manifest(cache: Path, manifest: dict) -> None:
    tmp = cache / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cache / MANIFEST)


# ----------------------------------------------------------------------------------- prepare
def prepare(cache_dir: Path | None = None, *, source: str = "stdlib", num_shards: int | None = None,
            vocab_size: int = 8192, force: bool = False, base_url: str | None = None,
            log: Callable[..., None] = print) -> dict:
    """Build shards, tokenizer and manifest in ``cache_dir``; a no-op when already complete.

    Args:
        cache_dir: target cache (``default_cache_dir()`` when None).
        source: ``"stdlib"``, ``"climbmix"`` or a folder of ``.txt``/``.parquet`` files.
        num_shards: ClimbMix training shards to download (default 10); only for ``"climbmix"``.
        vocab_size: tokenizer vocabulary, special tokens included.
        force: rebuild even when a complete cache exists (also needed to change its source or vocab).
        base_url: ClimbMix mirror (else ``$OPTUNA_TRIAGE_CLIMBMIX_URL``, else Hugging Face).
        log: where progress lines go.

    Returns:
        The manifest.

    Raises:
        DataError: unknown/empty source, failed download, or a complete cache made differently.
    """
    t0 = time.time()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source not in ("stdlib", "climbmix"):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise DataError(f"unknown source {source!r}: use stdlib, climbmix or an existing folder")
        source = str(folder.resolve())
    if num_shards is not None and source != "climbmix":
        raise DataError("--num-shards applies only to --source climbmix")
    if source == "climbmix":
        num_shards = CLIMBMIX_DEFAULT_SHARDS if num_shards is None else num_shards
        if num_shards < 1:
            raise DataError(f"--num-shards must be at least 1, got {num_shards}")
    request = {"source": source, "num_shards": num_shards, "vocab_size": vocab_size}

    if (cache / MANIFEST).exists() and not force:
        try:
            manifest = load_manifest(cache, full_check=True)
        except DataError as exc:
            log(f"Found an incomplete or damaged cache ({exc}); rebuilding")
        else:
            if manifest["request"] == request:
                log(f"Already prepared in {cache} (fingerprint {manifest['fingerprint'][:12]}); nothing to do")
                return manifest
            raise DataError(f"{cache} holds data prepared with {manifest['request']}: pass --force to replace it")

    # The manifest goes first: from here until it is rewritten the cache is visibly incomplete.
    (cache / MANIFEST).unlink(missing_ok=True)
    (cache / "data").mkdir(parents=True, exist_ok=True)
    for stale in (cache / "data").glob("*.tmp"):
        stale.unlink()
    # Downloaded shards survive an interrupted run (no manifest yet) only for the same source, so a
    # folder's or the stdlib's shard_00000 is never taken for ClimbMix's.
    marker = cache / "data" / ".source"
    if force or source != "climbmix" or not marker.is_file() or marker.read_text() != source:
        for old in (cache / "data").glob("*.parquet"):
            old.unlink()
    marker.write_text(source)
    log(f"Preparing {source} into {cache}")
    if source == "climbmix":
        url = base_url or os.environ.get(CLIMBMIX_URL_ENV) or CLIMBMIX_URL
        train_names = download_climbmix(cache, num_shards, url, log)
        info: dict = {"base_url": url, "val_shard_index": CLIMBMIX_VAL_INDEX}
        val_texts = list(read_texts([cache / VAL_SHARD]))
    else:
        docs, info = stdlib_documents() if source == "stdlib" else folder_documents(Path(source))
        train_names, val_texts = write_shards(docs, cache)
    train_paths = [cache / n for n in train_names]
    doc_counts = {n: parquet_rows(cache / n) for n in [*train_names, VAL_SHARD]}
    if not val_texts or not all(doc_counts[n] for n in train_names):
        raise DataError(f"an empty shard in {cache / 'data'}: check the source, then rerun with --force")
    log(f"Data: {sum(doc_counts[n] for n in train_names)} training documents in {len(train_names)} shards, "
        f"{doc_counts[VAL_SHARD]} validation documents")

    t1 = time.time()
    budget = iter(_capped(read_texts(train_paths), TOKENIZER_MAX_CHARS))
    encoding = tok.train_encoding(budget, vocab_size)
    tok.check_round_trip(encoding, val_texts[:20])
    written = tok.save_tokenizer(encoding, cache / "tokenizer")
    val_tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(val_texts))
    log(f"Tokenizer: {encoding.n_vocab} tokens trained in {time.time() - t1:.1f}s; "
        f"{val_tokens} validation tokens")

    files = {p.relative_to(cache).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in [*train_paths, cache / VAL_SHARD, *written]}
    manifest = {
        "format": FORMAT_VERSION, "request": request, "source": source, "source_info": info,
        "python_version": platform.python_version(), "vocab_size": vocab_size, "n_vocab": encoding.n_vocab,
        "bos_token_id": encoding.encode_single_token(tok.BOS_TOKEN), "train_shards": train_names,
        "val_shard": VAL_SHARD, "doc_counts": doc_counts, "val_tokens": val_tokens, "files": files,
        "fingerprint": _fingerprint(files), "seconds": round(time.time() - t0, 2),
    }
    _write_manifest(cache, manifest)
    log(f"Done in {time.time() - t0:.1f}s: {cache / MANIFEST}")
    return manifest


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= max_chars:
            return


class _OneLineParser(argparse.ArgumentParser):
    """Reports bad flags as one stderr line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of ``python -m train.prepare``."""
    parser = _OneLineParser(prog="python -m train.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"cache directory (default: ${CACHE_ENV}, else ~/.cache/optuna-triage)")
    parser.add_argument("--source", default="stdlib",
                        help="stdlib (default, offline), climbmix (download), or a folder of .txt/.parquet files")
    parser.add_argument("--num-shards", type=int, default=None,
                        help=f"ClimbMix training shards to download (default {CLIMBMIX_DEFAULT_SHARDS})")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary size (default 8192)")
    parser.add_argument("--base-url", default=None,
                        help=f"ClimbMix mirror URL (default: ${CLIMBMIX_URL_ENV} or Hugging Face)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 on bad input or data errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_shards is not None and args.source != "climbmix":
        parser.error("--num-shards applies only to --source climbmix")
    if args.num_shards is not None and args.num_shards < 1:
        parser.error("--num-shards must be at least 1")
    if args.vocab_size < 256 + len(tok.SPECIAL_TOKENS):
        parser.error(f"--vocab-size must be at least {256 + len(tok.SPECIAL_TOKENS)}")
    try:
        prepare(args.cache_dir, source=args.source, num_shards=args.num_shards, vocab_size=args.vocab_size,
                force=args.force, base_url=args.base_url)
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the cache stays marked incomplete until prepare finishes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
