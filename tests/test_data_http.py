"""URL lists and hub datasets, against an HTTP server the test starts on 127.0.0.1 (never the internet).

The server serves good PNG/JPEG images, a slow answer, a 404, a truncated body, a cut PNG, an HTML
page, images above the size limit (with and without Content-Length) and a URL that fails once and
then works. Every test runs under an alarm, so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import threading
import time
import tracemalloc
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Value, disable_progress_bars
from datasets import Image as ImageFeature
from PIL import Image

from theworld_core.config import DataConfig
from theworld_core.data import (
    BAD_REASONS,
    FETCH_REASONS,
    HUB_ALIASES,
    DataStats,
    PreparedData,
    TooManyBadSamples,
    prepare_data,
    stats_as_metrics,
)
from theworld_core.data.fetch import cache_path
from theworld_core.data.hub import hub_dataset_id

disable_progress_bars()

TEST_DEADLINE_S = 45
"""Each test is failed by SIGALRM after this long: nothing may hang."""
TIMEOUT_S = 1.0
SLOW_S = 5.0
MAX_BYTES = 50_000


@pytest.fixture(autouse=True)
def _deadline():
    def expire(signum, frame):
        raise TimeoutError(f"test still running after {TEST_DEADLINE_S}s: something hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_DEADLINE_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- the server ---------------------------------------------------------------------------------


def _encoded(colour: tuple[int, int, int], fmt: str, size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _noise_png(side: int) -> bytes:
    rng = random.Random(0)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), bytes(rng.randrange(256) for _ in range(side * side * 3))).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


RED = _encoded((220, 20, 20), "PNG")
BLUE = _encoded((20, 20, 220), "JPEG")
GREEN = _encoded((20, 200, 20), "PNG")
BIG = _noise_png(200)
GOOD_PATHS = {
    "/img/red.png": (RED, "image/png"),
    "/img/blue.jpg": (BLUE, "image/jpeg"),
    "/img/green.png": (GREEN, "image/png"),
}
assert len(BIG) > MAX_BYTES


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        server: _ImageServer = self.server  # type: ignore[assignment]
        path = urlsplit(self.path).path
        count = server.hit(path)
        try:
            self._answer(path, count)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts): expected
            pass

    def _send(self, status: int, body: bytes, content_type: str, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self, path: str, count: int) -> None:
        if path in GOOD_PATHS:
            body, content_type = GOOD_PATHS[path]
            self._send(200, body, content_type, len(body))
        elif path == "/slow.png":
            time.sleep(SLOW_S)
            self._send(200, RED, "image/png", len(RED))
        elif path == "/missing.png":
            self._send(404, b"not here", "text/plain", 8)
        elif path == "/truncated.png":  # promises the whole PNG, sends half, hangs up
            self._send(200, RED[: len(RED) // 2], "image/png", len(RED))
        elif path == "/cut.png":  # an honest Content-Length, but the PNG itself is cut
            self._send(200, GREEN[: len(GREEN) // 2], "image/png", len(GREEN) // 2)
        elif path == "/page.jpg":
            page = b"<!DOCTYPE html><html><body>Access denied</body></html>"
            self._send(200, page, "text/html", len(page))
        elif path == "/big.png":
            self._send(200, BIG, "image/png", len(BIG))
        elif path == "/big-unsized.png":  # no Content-Length: the limit must bite while streaming
            self._send(200, BIG, "image/png", None)
        elif path == "/flaky.png":  # fails once, then works
            if count == 1:
                self._send(503, b"busy", "text/plain", 4)
            else:
                self._send(200, BLUE, "image/jpeg", len(BLUE))
        else:
            self._send(404, b"unknown", "text/plain", 7)


class _ImageServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops connections under concurrent fetching

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()

    def hit(self, path: str) -> int:
        with self._lock:
            self.hits[path] += 1
            return self.hits[path]

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 - quiet about dropped clients
        pass

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def good_hits(self) -> int:
        with self._lock:
            return sum(self.hits[path] for path in GOOD_PATHS)


@pytest.fixture
def server():
    httpd = _ImageServer()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --- lists and configs --------------------------------------------------------------------------

GOOD_COUNT = 12
BAD_ROWS = {
    "/slow.png": "timeout",
    "/missing.png": "http_404",
    "/truncated.png": "truncated",
    "/cut.png": "corrupt_image",
    "/page.jpg": "not_an_image",
    "/big.png": "too_large",
    "/big-unsized.png": "too_large",
}


def _rows(server: _ImageServer) -> list[dict]:
    """12 good rows (three images under distinct `?i=` URLs), the flaky one (good in the end), one
    row per bad kind, a non-http URL, a row without URL and one without caption."""
    goods = list(GOOD_PATHS)
    rows = [
        {"uid": f"good-{index}", "url": server.url(f"{goods[index % 3]}?i={index}"), "text": f"caption {index}"}
        for index in range(GOOD_COUNT)
    ]
    rows.append({"uid": "flaky", "url": server.url("/flaky.png"), "caption": "works the second time"})
    rows += [{"uid": f"bad{path}", "url": server.url(path), "text": "bad"} for path in BAD_ROWS]
    rows.append({"uid": "ftp", "url": "ftp://127.0.0.1/red.png", "text": "not http"})
    rows.append({"uid": "no-url", "text": "nothing to fetch"})
    rows.append({"uid": "no-text", "url": server.url("/img/red.png?i=notext")})
    return rows


EXPECTED_BAD = {**Counter(BAD_ROWS.values()), "bad_url": 1, "bad_record": 1, "missing_text": 1}
EXPECTED_GOOD = GOOD_COUNT + 1  # the flaky URL succeeds on its retry


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    columns = ("uid", "url", "text", "caption")
    pq.write_table(pa.table({column: [row.get(column) for row in rows] for column in columns}), path)
    return path


def _cfg(tmp_path: Path, dataset: Path | str, **overrides) -> DataConfig:
    settings = {
        "dataset_name": str(dataset),
        "fetch_timeout_s": TIMEOUT_S,
        "fetch_retries": 1,
        "fetch_backoff_s": 0.01,
        "fetch_max_bytes": MAX_BYTES,
        "fetch_concurrency": 8,
        "image_cache_dir": str(tmp_path / "images"),
        "max_bad_fraction": 0.6,
        **overrides,
    }
    return DataConfig(**settings)


def _prepare(cfg: DataConfig, tmp_path: Path, table_cache: str = "tables") -> PreparedData:
    return prepare_data(cfg, cache_dir=tmp_path / table_cache)


def _ids(prepared: PreparedData) -> list[str]:
    """Every usable sample id (train and eval), checking each image decodes to RGB."""
    ids = []
    for split in (prepared.train, prepared.eval):
        for sample in split:
            assert sample["image"].mode == "RGB" and sample["image"].size == (16, 16)
            ids.append(sample["id"])
    return ids


# --- URL lists ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "streaming"), [("jsonl", False), ("parquet", False), ("jsonl", True)])
def test_good_images_load_and_every_bad_one_is_counted_by_reason(server, tmp_path, fmt, streaming):
    rows = _rows(server)
    listing = (_jsonl if fmt == "jsonl" else _parquet)(tmp_path / f"urls.{fmt}", rows)
    started = time.monotonic()
    prepared = _prepare(_cfg(tmp_path, listing, streaming=streaming), tmp_path)
    ids = _ids(prepared)
    elapsed = time.monotonic() - started

    assert sorted(ids) == sorted([f"good-{index}" for index in range(GOOD_COUNT)] + ["flaky"])
    stats = prepared.stats
    assert stats.complete and stats.total == len(rows)
    assert stats.bad_reasons == EXPECTED_BAD
    assert stats.train + stats.eval == EXPECTED_GOOD and stats.bad == len(rows) - EXPECTED_GOOD
    if not streaming:  # (streaming may read a URL twice: the at-least-one eval rule tries candidates)
        assert server.hits["/flaky.png"] == 2  # failed once (503), retried, cached
        assert server.hits["/missing.png"] == 1  # a 404 is not retried
        assert server.hits["/big.png"] == 1  # refused on its Content-Length, not retried
        assert server.hits["/slow.png"] == 2 and server.hits["/truncated.png"] == 2  # transient: retried once
    assert elapsed < SLOW_S * 2, f"took {elapsed:.1f}s: the timeouts did not cut the slow answer short"
    assert "urls" in prepared.source or "URL list" in prepared.source


def test_stage_fails_past_the_bad_share_with_a_clear_message(server, tmp_path):
    listing = _jsonl(tmp_path / "urls.jsonl", _rows(server))
    with pytest.raises(TooManyBadSamples) as caught:
        _prepare(_cfg(tmp_path, listing, max_bad_fraction=0.2), tmp_path)
    message = str(caught.value)
    bad, total = len(_rows(server)) - EXPECTED_GOOD, len(_rows(server))
    assert f"{bad} of {total} samples" in message and "max_bad_fraction=0.2" in message
    for reason in ("timeout", "http_404", "truncated", "not_an_image", "too_large=2"):
        assert reason in message


def test_a_rerun_and_a_second_epoch_hit_the_disk_cache(server, tmp_path):
    rows = [row for row in _rows(server) if "slow" not in row.get("url", "")]  # (speed only)
    listing = _jsonl(tmp_path / "urls.jsonl", rows)
    first = _prepare(_cfg(tmp_path, listing), tmp_path, table_cache="tables-1")
    assert len(_ids(first)) == EXPECTED_GOOD
    fetched = server.good_hits()
    assert fetched == GOOD_COUNT  # each good URL once (the caption-less row is bad without a fetch)
    for row in rows[:GOOD_COUNT]:
        assert cache_path(tmp_path / "images", row["url"]).read_bytes() in {RED, BLUE, GREEN}
    assert cache_path(tmp_path / "images", rows[0]["url"]).name == hashlib.sha256(rows[0]["url"].encode()).hexdigest()
    assert not list((tmp_path / "images").rglob("*.tmp"))  # atomic writes leave no temporary files

    # A fresh table cache forces the rows to be made again: the images come from disk.
    second = _prepare(_cfg(tmp_path, listing), tmp_path, table_cache="tables-2")
    assert len(_ids(second)) == EXPECTED_GOOD and second.fingerprint == first.fingerprint
    assert server.good_hits() == fetched and server.hits["/flaky.png"] == 2

    # Streaming: every epoch reads the list again, the images from the disk cache.
    stream = _prepare(_cfg(tmp_path, listing, streaming=True), tmp_path, table_cache="tables-3")
    assert len(_ids(stream)) == EXPECTED_GOOD
    assert len(list(stream.train)) == stream.stats.train
    assert server.good_hits() == fetched


def test_fingerprint_follows_the_list_not_the_network(server, tmp_path):
    rows = [row for row in _rows(server) if "slow" not in row.get("url", "")]
    listing = _jsonl(tmp_path / "urls.jsonl", rows)
    cfg = _cfg(tmp_path, listing, streaming=True, max_bad_fraction=1.0)
    first = _prepare(cfg, tmp_path)
    again = _prepare(cfg, tmp_path)
    assert again.fingerprint == first.fingerprint
    rows[0]["text"] = "another caption"
    _jsonl(listing, rows)
    assert _prepare(cfg, tmp_path).fingerprint != first.fingerprint


def test_streaming_a_long_list_stays_in_bounded_memory(server, tmp_path):
    """5,000 URLs (the same three images behind `?i=`), num_samples 600: only those are fetched,
    the list is read in batches, and the traced peak stays far below what holding the rows or
    images would take."""
    goods = list(GOOD_PATHS)
    count = 5000
    table = pa.table(
        {
            "uid": [f"u{index}" for index in range(count)],
            "url": [server.url(f"{goods[index % 3]}?i={index}") for index in range(count)],
            "text": [f"caption number {index} " + "x" * 200 for index in range(count)],
        }
    )
    listing = tmp_path / "long.parquet"
    pq.write_table(table, listing, row_group_size=500)
    del table
    # Nothing slow is served here; a generous timeout keeps a loaded machine (and tracemalloc) from failing it.
    cfg = _cfg(
        tmp_path,
        listing,
        streaming=True,
        num_samples=600,
        max_bad_fraction=0.0,
        fetch_concurrency=16,
        fetch_timeout_s=10,
    )
    tracemalloc.start()
    try:
        prepared = _prepare(cfg, tmp_path)
        seen = sum(1 for _ in prepared.train)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == prepared.stats.train and prepared.stats.total == 600 and prepared.stats.bad == 0
    assert server.good_hits() == 600  # nothing past num_samples, nothing twice
    assert peak < 40 * 2**20, f"traced peak {peak / 2**20:.1f} MiB"


def test_a_list_of_only_slow_urls_finishes_within_its_deadlines(server, tmp_path):
    rows = [{"uid": f"s{index}", "url": server.url(f"/slow.png?i={index}"), "text": "slow"} for index in range(12)]
    rows.append({"uid": "ok", "url": server.url("/img/red.png"), "text": "fine"})
    listing = _jsonl(tmp_path / "slow.jsonl", rows)
    started = time.monotonic()
    prepared = _prepare(_cfg(tmp_path, listing, fetch_retries=0, fetch_concurrency=6, max_bad_fraction=1.0), tmp_path)
    elapsed = time.monotonic() - started
    assert prepared.stats.bad_reasons == {"timeout": 12}
    # 12 timeouts, 6 at a time: two rounds of one timeout each, not twelve serial ones or SLOW_S.
    assert elapsed < SLOW_S, f"took {elapsed:.1f}s"


# --- hub datasets (offline: a local dataset folder through the same load_dataset call) -----------


def _image_dataset_folder(root: Path) -> Path:
    colours = [(index * 20, 100, 200 - index * 20) for index in range(8)]
    images = [{"bytes": _encoded(colour, "PNG"), "path": None} for colour in colours]
    dataset = Dataset.from_dict(
        {"image": images, "caption": [f"colour {index}" for index in range(8)], "extra": list(range(8))},
        features=Features({"image": ImageFeature(), "caption": Value("string"), "extra": Value("int64")}),
    )
    (root / "data").mkdir(parents=True)
    dataset.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


@pytest.fixture
def private_datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_image_dataset_through_load_dataset(tmp_path, private_datasets_cache, streaming):
    folder = _image_dataset_folder(tmp_path / "hub-images")
    prepared = _prepare(DataConfig(dataset_name=f"hf:{folder}", streaming=streaming), tmp_path)
    samples = {sample["id"]: sample for split in (prepared.train, prepared.eval) for sample in split}
    assert sorted(samples) == [str(index) for index in range(8)]
    assert samples["3"]["text"] == "colour 3"  # `caption` mapped to the text column
    assert samples["3"]["image"].getpixel((0, 0)) == (60, 100, 140)
    assert prepared.stats.bad == 0 and prepared.source.startswith("hub dataset")
    assert (
        prepared.fingerprint
        == _prepare(DataConfig(dataset_name=f"hf:{folder}", streaming=streaming), tmp_path).fingerprint
    )


def test_hub_url_list_in_datacomp_layout(server, tmp_path, private_datasets_cache):
    folder = tmp_path / "hub-urls"
    (folder / "data").mkdir(parents=True)
    rows = [
        {
            "uid": f"{index:032x}",
            "url": server.url(f"/img/red.png?i={index}"),
            "text": f"red {index}",
            "clip_b32_similarity_score": 0.3,
        }
        for index in range(6)
    ]
    rows.append({"uid": "f" * 32, "url": server.url("/missing.png"), "text": "gone", "clip_b32_similarity_score": 0.1})
    _jsonl(folder / "data" / "train.jsonl", rows)
    prepared = _prepare(_cfg(tmp_path, f"hf:{folder}", num_samples=7), tmp_path)
    assert sorted(_ids(prepared)) == sorted(row["uid"] for row in rows[:6])
    assert prepared.stats.bad_reasons == {"http_404": 1}
    assert "URL list" in prepared.source


def test_datacomp_is_an_alias_of_the_documented_hub_id(monkeypatch, tmp_path):
    assert HUB_ALIASES["datacomp"] == "mlfoundations/datacomp_1b"
    assert hub_dataset_id("datacomp") == hub_dataset_id("hf:mlfoundations/datacomp_1b") == "mlfoundations/datacomp_1b"
    import datasets

    calls = []

    def no_network(path, **kwargs):
        calls.append((path, kwargs))
        raise ConnectionError("offline in tests")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    for name in ("datacomp", "someone/some-set", "hf:someone/some-set"):
        with pytest.raises(ValueError, match="could not open the hub dataset .* offline in tests"):
            prepare_data(DataConfig(dataset_name=name, num_samples=1000, streaming=False))
    assert calls == [
        ("mlfoundations/datacomp_1b", {"split": "train", "streaming": True}),  # num_samples: no full download
        ("someone/some-set", {"split": "train", "streaming": True}),
        ("someone/some-set", {"split": "train", "streaming": True}),
    ]


def test_a_jsonl_of_image_paths_is_still_a_local_table(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    listing = _jsonl(
        tmp_path / "m.jsonl", [{"file_name": "a.png", "text": "local", "url": "http://127.0.0.1:9/unused"}]
    )
    prepared = _prepare(DataConfig(dataset_name=str(listing)), tmp_path)
    assert prepared.stats.total == 1 and prepared.stats.bad == 0 and prepared.source.startswith("jsonl file")


# --- metrics --------------------------------------------------------------------------------------


def test_stats_as_metrics_has_every_reason():
    stats = DataStats(total=10, train=6, eval=1, bad=3, bad_reasons={"http_404": 2, "something_new": 1})
    metrics = stats_as_metrics(stats)
    assert metrics["data/total"] == 10.0 and metrics["data/train"] == 6.0 and metrics["data/eval"] == 1.0
    assert metrics["data/bad"] == 3.0 and metrics["data/bad_fraction"] == pytest.approx(0.3)
    assert metrics["data/bad/http_404"] == 2.0 and metrics["data/bad/something_new"] == 1.0
    assert metrics["data/bad/timeout"] == 0.0 and metrics["data/complete"] == 1.0
    assert set(FETCH_REASONS) <= set(BAD_REASONS) and all(isinstance(value, float) for value in metrics.values())
    assert {f"data/bad/{reason}" for reason in BAD_REASONS} <= set(metrics)
    assert all(key.startswith("data/") for key in metrics) and os.sep not in "".join(BAD_REASONS)
