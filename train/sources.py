"""Where documents come from: the stdlib, a user folder, or downloaded ClimbMix shards.

Every source yields ``(key, text)`` documents; the key (a relative path, plus ``#n`` for pieces and
parquet rows) decides the validation split and the order in which documents are written.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import platform
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CLIMBMIX_URL_ENV = "OPTUNA_TRIAGE_CLIMBMIX_URL"
CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_VAL_INDEX = 6542  # autoresearch pins the dataset's last shard for validation
CLIMBMIX_DEFAULT_SHARDS = 10
VAL_SHARD = "data/val.parquet"
VAL_PERCENT = 5  # share of documents (by hash of their key) that go to the validation shard
STDLIB_DOC_CHARS = 1_500  # stdlib files are split into ~1.5 kB documents at top-level statements
DOWNLOAD_ATTEMPTS = 3
RETRY_DELAY = 1.0  # seconds, doubled per attempt
DOWNLOAD_TIMEOUT = 30.0


_DEF_STARTS = ("def ", "async def ", "class ", "@")


class DataError(RuntimeError):
    """Missing, empty or corrupt data. The message is one line and says what to do."""


def is_val(key: str) -> bool:
    # A hash of the document's key, not its position: the split survives added or removed files.
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 100 < VAL_PERCENT


def order_key(key: str) -> bytes:
    # Documents are written in hash order, so the first minutes of training see the whole source
    # rather than the alphabetically first modules; still deterministic.
    return hashlib.sha256(b"order:" + key.encode()).digest()


def split_source_file(text: str, target: int = STDLIB_DOC_CHARS) -> list[str]:
    """Split Python source into documents of about ``target`` characters.

    Cuts go before a top-level statement or a (method) definition that follows a blank line, once
    the piece holds ``target`` characters (or anywhere past ``4 * target``), so pieces are mostly
    whole functions.
    """
    pieces: list[str] = []
    current: list[str] = []
    size, prev_blank = 0, False
    for line in text.splitlines(keepends=True):
        head = line.lstrip()
        top_level = prev_blank and (line[:1].isalpha() or line[:1] in "@_#" or head.startswith(_DEF_STARTS))
        if current and (size >= 4 * target or (size >= target and top_level)):
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
        prev_blank = not line.strip()
    if current and "".join(current).strip():
        pieces.append("".join(current))
    return pieces


def stdlib_documents() -> tuple[list[tuple[str, str]], dict]:
    """(key, text) documents from this interpreter's standard-library ``.py`` files, and source info."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # a few test fixtures are deliberately mis-encoded
            continue
        docs.extend((f"{rel}#{i}", piece) for i, piece in enumerate(split_source_file(text)))
    info = {"python": platform.python_version(), "implementation": sys.implementation.name, "path": str(root)}
    return docs, info


def _first_sentence(exc: Exception) -> str:
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    return text.split(". ")[0][:100]


def parquet_rows(path: Path) -> int:
    """Row count of a parquet file with a string ``text`` column; ``DataError`` otherwise."""
    try:
        schema = pq.read_schema(path)
        rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path} is not a readable parquet file ({_first_sentence(exc)})") from None
    if "text" not in schema.names or not pa.types.is_string(schema.field("text").type) and \
            not pa.types.is_large_string(schema.field("text").type):
        raise DataError(f"{path} has no string `text` column (columns: {', '.join(schema.names)})")
    return rows


def read_texts(paths: Iterable[Path]) -> Iterator[str]:
    """Non-empty ``text`` values of parquet files, streamed one row group at a time."""
    for path in paths:
        parquet_rows(path)
        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            try:
                column = pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"{path} is corrupt ({_first_sentence(exc)})") from None
            yield from (t for t in column if t)


def folder_documents(folder: Path) -> tuple[list[tuple[str, str]], dict]:
    """(key, text) documents from a folder's ``.txt`` files (one each) and ``.parquet`` rows."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".txt", ".parquet"))
    docs = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                docs.append((rel, text))
        else:
            docs.extend((f"{rel}#{i}", t) for i, t in enumerate(read_texts([path])))
    if not docs:
        raise DataError(f"no documents in {folder}: it needs non-empty .txt files or .parquet files "
                        "with a `text` column")
    return docs, {"path": str(folder), "files": len(files)}


def _download(url: str, dest: Path, log: Callable[..., None]) -> None:
    """Fetch ``url`` to ``dest`` through ``dest.tmp`` with retries; the temp file never survives a failure."""
    tmp = dest.with_name(dest.name + ".tmp")
    reason = ""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(tmp, "wb") as f:
                expected = response.headers.get("Content-Length")
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            if expected is not None and tmp.stat().st_size != int(expected):
                raise DataError(f"got {tmp.stat().st_size} of {expected} bytes")
            parquet_rows(tmp)
            os.replace(tmp, dest)
            return
        except (OSError, http.client.HTTPException, DataError) as exc:
            reason = (str(getattr(exc, "reason", None) or exc).splitlines() or [type(exc).__name__])[0][:100]
            tmp.unlink(missing_ok=True)
            if isinstance(exc, urllib.error.HTTPError) and exc.code == 404:
                break  # retrying cannot make a missing shard appear
            if attempt < DOWNLOAD_ATTEMPTS:
                log(f"  attempt {attempt}/{DOWNLOAD_ATTEMPTS} for {dest.name} failed ({reason}); retrying")
                time.sleep(RETRY_DELAY * 2 ** (attempt - 1))
    raise DataError(f"could not download {url} ({reason}): check the network, or use --source stdlib")


def download_climbmix(cache: Path, num_shards: int, base_url: str, log: Callable[..., None]) -> list[str]:
    """Download training shards ``0..num_shards-1`` and the pinned val shard; keep valid earlier downloads."""
    wanted = {f"data/shard_{i:05d}.parquet": f"shard_{i:05d}.parquet" for i in range(num_shards)}
    wanted[VAL_SHARD] = f"shard_{CLIMBMIX_VAL_INDEX:05d}.parquet"
    (cache / "data").mkdir(parents=True, exist_ok=True)
    todo = []
    for rel, remote in wanted.items():
        try:
            parquet_rows(cache / rel)
        except DataError:  # absent or damaged: fetch it again
            todo.append((f"{base_url.rstrip('/')}/{remote}", cache / rel))
    log(f"Data: downloading {len(todo)} of {len(wanted)} ClimbMix shards from {base_url}")
    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(_download, url, dest, log) for url, dest in todo]:
            future.result()
    return [rel for rel in wanted if rel != VAL_SHARD]
