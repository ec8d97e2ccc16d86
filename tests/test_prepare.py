"""prepare: sources, shards, the pinned val shard, idempotency, damage detection, downloads, the CLI."""

from __future__ import annotations

import http.server
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train import sources
from train.prepare import DataError, default_cache_dir, load_manifest, main, prepare
from train.sources import read_texts, split_source_file

VOCAB = 300
QUIET = {"log": lambda *a, **k: None}


def _texts(cache: Path, names: list[str]) -> list[str]:
    return list(read_texts([cache / n for n in names]))


def _parquet_bytes(texts: list[str]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), sink)
    return sink.getvalue()


@pytest.fixture()
def cache(tmp_path: Path, tiny_corpus: Path) -> Path:
    """A fresh prepared cache this test may damage."""
    target = tmp_path / "cache"
    prepare(target, source=str(tiny_corpus), vocab_size=VOCAB, **QUIET)
    return target


def test_prepare_writes_disjoint_train_and_val_shards(prepared_cache: Path, tiny_corpus: Path) -> None:
    manifest = load_manifest(prepared_cache, full_check=True)
    assert manifest["val_shard"] == "data/val.parquet"
    assert manifest["val_shard"] not in manifest["train_shards"]
    train, val = _texts(prepared_cache, manifest["train_shards"]), _texts(prepared_cache, ["data/val.parquet"])
    originals = sorted(p.read_text(encoding="utf-8") for p in tiny_corpus.glob("*.txt"))
    assert sorted(train + val) == originals  # every document exactly once
    assert val and not set(val) & set(train)
    assert manifest["doc_counts"] == {"data/shard_00000.parquet": len(train), "data/val.parquet": len(val)}
    assert manifest["n_vocab"] == 512 and manifest["val_tokens"] > 0


def test_prepare_is_deterministic(tmp_path: Path, tiny_corpus: Path, prepared_cache: Path) -> None:
    again = prepare(tmp_path / "again", source=str(tiny_corpus), vocab_size=512, **QUIET)
    assert again["fingerprint"] == load_manifest(prepared_cache)["fingerprint"]


def test_prepare_second_run_is_a_noop(cache: Path, tiny_corpus: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    lines: list[str] = []
    prepare(cache, source=str(tiny_corpus), vocab_size=VOCAB, log=lines.append)
    assert "nothing to do" in lines[-1]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before


@pytest.mark.parametrize("damage", ["truncate_shard", "truncate_val", "delete_manifest", "truncate_tokenizer",
                                    "delete_token_bytes", "garbage_manifest"])
def test_prepare_damage_is_detected_and_repaired(cache: Path, tiny_corpus: Path, damage: str) -> None:
    target = {"truncate_shard": "data/shard_00000.parquet", "truncate_val": "data/val.parquet",
              "delete_manifest": "manifest.json", "truncate_tokenizer": "tokenizer/tokenizer.pkl",
              "delete_token_bytes": "tokenizer/token_bytes.pt", "garbage_manifest": "manifest.json"}[damage]
    path = cache / target
    if damage.startswith("truncate"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage.startswith("delete"):
        path.unlink()
    else:
        path.write_text("{not json")
    with pytest.raises(DataError, match="python -m train.prepare") as info:
        load_manifest(cache)
    assert "\n" not in str(info.value)
    lines: list[str] = []
    manifest = prepare(cache, source=str(tiny_corpus), vocab_size=VOCAB, log=lines.append)
    assert not any("nothing to do" in line for line in lines)
    assert load_manifest(cache, full_check=True) == manifest


def test_prepare_same_size_corruption_caught_by_full_check(cache: Path, tiny_corpus: Path) -> None:
    shard = cache / "data/shard_00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    load_manifest(cache)  # sizes still match: the cheap check passes
    with pytest.raises(DataError, match="damaged"):
        load_manifest(cache, full_check=True)
    lines: list[str] = []
    prepare(cache, source=str(tiny_corpus), vocab_size=VOCAB, log=lines.append)
    assert "rebuilding" in lines[0]


def test_prepare_leftover_temp_files_never_count(cache: Path, tiny_corpus: Path) -> None:
    (cache / "manifest.json").unlink()
    (cache / "data/shard_00001.parquet.tmp").write_bytes(b"half a shard")
    with pytest.raises(DataError, match="no prepared data"):
        load_manifest(cache)
    manifest = prepare(cache, source=str(tiny_corpus), vocab_size=VOCAB, **QUIET)
    assert not list(cache.rglob("*.tmp"))
    assert manifest["train_shards"] == ["data/shard_00000.parquet"]


def test_prepare_other_request_needs_force(cache: Path, tiny_corpus: Path) -> None:
    with pytest.raises(DataError, match="--force"):
        prepare(cache, source=str(tiny_corpus), vocab_size=VOCAB + 10, **QUIET)
    manifest = prepare(cache, source=str(tiny_corpus), vocab_size=VOCAB + 10, force=True, **QUIET)
    assert manifest["n_vocab"] == VOCAB + 10


def test_prepare_folder_with_txt_and_parquet(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    txt = [f"plain text document {i} with naïve words\n" * 3 for i in range(30)]
    for i, text in enumerate(txt):
        (folder / "sub" / f"{i}.txt").write_text(text, encoding="utf-8")
    (folder / "empty.txt").write_text("  \n")
    (folder / "ignored.md").write_text("not a source file")
    rows = [f"parquet row {i}: café {i * i}" for i in range(40)]
    pq.write_table(pa.table({"text": rows + [None, ""], "id": list(range(42))}), folder / "rows.parquet")
    manifest = prepare(tmp_path / "cache", source=str(folder), vocab_size=VOCAB, **QUIET)
    everything = _texts(tmp_path / "cache", [*manifest["train_shards"], manifest["val_shard"]])
    assert sorted(everything) == sorted(txt + rows)
    assert manifest["source"] == str(folder.resolve())


@pytest.mark.parametrize(("setup", "message"), [
    ("empty", "no documents"),
    ("no_text_column", "no string `text` column"),
    ("corrupt_parquet", "not a readable parquet"),
    ("one_document", "at least 2 documents"),
    ("missing", "unknown source"),
])
def test_prepare_bad_folder_raises_data_error(tmp_path: Path, setup: str, message: str) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    if setup == "no_text_column":
        pq.write_table(pa.table({"body": ["a", "b"]}), folder / "x.parquet")
    elif setup == "corrupt_parquet":
        (folder / "x.parquet").write_bytes(b"PAR1 garbage")
    elif setup == "one_document":
        (folder / "only.txt").write_text("just one")
    elif setup == "missing":
        folder = tmp_path / "nope"
    with pytest.raises(DataError, match=message):
        prepare(tmp_path / "cache", source=str(folder), vocab_size=VOCAB, **QUIET)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_prepare_stdlib_source_excludes_site_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = tmp_path / "lib"
    for name in ("os.py", "json/__init__.py", "json/decoder.py", "site-packages/pkg/mod.py", "bad.py"):
        (lib / name).parent.mkdir(parents=True, exist_ok=True)
        (lib / name).write_text(f"# {name}\ndef f():\n    return {name!r}\n" * 5)
    (lib / "bad.py").write_bytes(b"x = '\xff\xfe'\n")  # not UTF-8: skipped
    monkeypatch.setattr(sources.sysconfig, "get_paths", lambda: {"stdlib": str(lib)})
    manifest = prepare(tmp_path / "cache", vocab_size=VOCAB, **QUIET)
    assert manifest["source"] == "stdlib" and manifest["source_info"]["python"] == manifest["python_version"]
    texts = _texts(tmp_path / "cache", [*manifest["train_shards"], manifest["val_shard"]])
    assert sorted(t.splitlines()[0] for t in texts) == ["# json/__init__.py", "# json/decoder.py", "# os.py"]


@pytest.mark.parametrize("target", [10, 200, 5000])
def test_split_source_file_keeps_every_line(target: int) -> None:
    text = "".join(f"def f{i}():\n    return {i}\n\n" for i in range(200))
    text += "class C:\n\n    def m(self):\n        pass\n"
    pieces = split_source_file(text, target)
    assert "".join(pieces) == text
    assert all(len(p) <= 4 * target + 40 for p in pieces)
    if target < len(text):
        assert len(pieces) > 1 and all(p.startswith(("def ", "class ", "    def")) for p in pieces)


# ----------------------------------------------------------------------------------- climbmix
class _Server:
    """A local HTTP server with scripted responses: path -> list of (status, body, claimed length)."""

    def __init__(self) -> None:
        self.script: dict[str, list[tuple[int, bytes, int | None]]] = {}
        self.hits: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.hits.append(self.path)
                steps = outer.script.get(self.path, [(404, b"", None)])
                status, body, length = steps.pop(0) if len(steps) > 1 else steps[0]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    monkeypatch.setattr(sources, "RETRY_DELAY", 0.0)
    srv = _Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _serve_shards(server: _Server, n: int) -> dict[str, list[str]]:
    texts = {}
    for index in [*range(n), sources.CLIMBMIX_VAL_INDEX]:
        texts[f"shard_{index:05d}"] = [f"climbmix shard {index} document {j}: words café " * 4 for j in range(30)]
        server.script[f"/data/shard_{index:05d}.parquet"] = [(200, _parquet_bytes(texts[f"shard_{index:05d}"]), None)]
    return texts


def test_prepare_climbmix_downloads_shards_and_pinned_val(server: _Server, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    texts = _serve_shards(server, 2)
    monkeypatch.setenv("OPTUNA_TRIAGE_CLIMBMIX_URL", server.url)
    cache = tmp_path / "cache"
    manifest = prepare(cache, source="climbmix", num_shards=2, vocab_size=VOCAB, **QUIET)
    assert manifest["train_shards"] == ["data/shard_00000.parquet", "data/shard_00001.parquet"]
    assert _texts(cache, ["data/val.parquet"]) == texts["shard_06542"]
    assert _texts(cache, ["data/shard_00001.parquet"]) == texts["shard_00001"]
    assert manifest["source_info"]["base_url"] == server.url
    hits = len(server.hits)
    prepare(cache, source="climbmix", num_shards=2, vocab_size=VOCAB, **QUIET)  # no-op: no new requests
    assert len(server.hits) == hits


def test_prepare_climbmix_retries_partial_download(server: _Server, tmp_path: Path) -> None:
    texts = _serve_shards(server, 1)
    good = server.script["/data/shard_00000.parquet"][0]
    # First answer claims more bytes than it sends (a dropped connection), second is a 503.
    server.script["/data/shard_00000.parquet"] = [(200, good[1][:100], len(good[1])), (503, b"busy", None), good]
    manifest = prepare(tmp_path / "c", source="climbmix", num_shards=1, vocab_size=VOCAB, base_url=server.url,
                       **QUIET)
    assert server.hits.count("/data/shard_00000.parquet") == 3
    assert _texts(tmp_path / "c", manifest["train_shards"]) == texts["shard_00000"]
    assert not list((tmp_path / "c").rglob("*.tmp"))


@pytest.mark.parametrize("failure", ["always_500", "always_partial", "not_parquet", "missing_404"])
def test_prepare_climbmix_failed_download_leaves_nothing(server: _Server, tmp_path: Path, failure: str) -> None:
    _serve_shards(server, 2)
    body = server.script["/data/shard_00001.parquet"][0][1]
    server.script["/data/shard_00001.parquet"] = {
        "always_500": [(500, b"oops", None)], "always_partial": [(200, body[:50], len(body))],
        "not_parquet": [(200, b"<html>rate limited</html>", None)], "missing_404": [(404, b"", None)],
    }[failure]
    cache = tmp_path / "c"
    with pytest.raises(DataError, match="could not download .*shard_00001.parquet") as info:
        prepare(cache, source="climbmix", num_shards=2, vocab_size=VOCAB, base_url=server.url, **QUIET)
    assert "\n" not in str(info.value)
    assert server.hits.count("/data/shard_00001.parquet") == (1 if failure == "missing_404" else 3)
    assert not (cache / "data/shard_00001.parquet").exists() and not list(cache.rglob("*.tmp"))
    assert not (cache / "manifest.json").exists()
    # The shards that did arrive are kept: a later run only fetches the missing one.
    server.script["/data/shard_00001.parquet"] = [(200, body, None)]
    server.hits.clear()
    prepare(cache, source="climbmix", num_shards=2, vocab_size=VOCAB, base_url=server.url, **QUIET)
    assert server.hits == ["/data/shard_00001.parquet"]


def test_prepare_climbmix_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "RETRY_DELAY", 0.0)
    with pytest.raises(DataError, match="check the network") as info:
        prepare(tmp_path / "c", source="climbmix", num_shards=1, base_url="http://127.0.0.1:9/none", **QUIET)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------- CLI, cache dir
@pytest.mark.parametrize(("env", "expected"), [
    ({"OPTUNA_TRIAGE_CACHE": "/x/cache", "XDG_CACHE_HOME": "/y"}, "/x/cache"),
    ({"XDG_CACHE_HOME": "/y"}, "/y/optuna-triage"),
    ({"HOME": "/home/u"}, "/home/u/.cache/optuna-triage"),
])
def test_default_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str) -> None:
    for name in ("OPTUNA_TRIAGE_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_cache_dir() == Path(expected)


def test_cli_prepares_then_noop(tmp_path: Path, tiny_corpus: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTUNA_TRIAGE_CACHE", str(tmp_path / "env-cache"))
    assert main(["--source", str(tiny_corpus), "--vocab-size", str(VOCAB)]) == 0
    assert json.loads((tmp_path / "env-cache/manifest.json").read_text())["vocab_size"] == VOCAB
    assert main(["--source", str(tiny_corpus), "--vocab-size", str(VOCAB)]) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    ["--source", "no-such-source"],
    ["--source", "{empty}"],
    ["--source", "stdlib", "--num-shards", "3"],
    ["--source", "climbmix", "--num-shards", "0"],
    ["--vocab-size", "100"],
    ["--vocab-size", "many"],
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             args: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")) for a in args]
    try:
        status = main(["--cache-dir", str(tmp_path / "c"), *args])
    except SystemExit as exc:  # argparse's parser.error
        status = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith(("error:", "python -m train.prepare: error:"))


def test_cli_module_reports_missing_source_without_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "train.prepare", "--cache-dir", str(tmp_path),
                             "--source", str(tmp_path / "missing")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown source" in result.stderr



def test_prepare_climbmix_never_reuses_other_sources_shards(server: _Server, tmp_path: Path,
                                                            tiny_corpus: Path) -> None:
    texts = _serve_shards(server, 1)
    cache = tmp_path / "c"
    prepare(cache, source=str(tiny_corpus), vocab_size=VOCAB, **QUIET)
    (cache / "manifest.json").unlink()  # an interrupted switch of source
    manifest = prepare(cache, source="climbmix", num_shards=1, vocab_size=VOCAB, base_url=server.url, **QUIET)
    assert _texts(cache, manifest["train_shards"]) == texts["shard_00000"]
    assert sorted(server.hits) == ["/data/shard_00000.parquet", "/data/shard_06542.parquet"]
