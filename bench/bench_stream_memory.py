"""Peak memory of streaming a URL list, against the list's length (CPU, a local HTTP server).

    .venv/bin/python bench/bench_stream_memory.py                      # 1k, 5k, 20k rows
    .venv/bin/python bench/bench_stream_memory.py --lengths 1000 50000 --concurrency 32

Per length, a parquet URL list in DataComp's layout (`uid`, `url`, `text`) whose rows point at three
256x256 images (two PNGs of about 1 KB, a JPEG of about 18 KB) served by `http.server` on
127.0.0.1 in this process, each row under its own `?i=` query string (so every row is a distinct
URL and a distinct fetch). A fresh child process per length (its own peak RSS) runs
`prepare_data(streaming=True)` (fingerprints the list, fetches the eval images) and iterates the
train split twice: epoch 1 fetches every image, epoch 2 reads them from the disk cache.

Reported per length: RSS after imports (baseline; torch included, which `datasets` imports on the
first preparation anyway), RSS after preparation, RSS a tenth into epoch 1 and at its end, at the
end of epoch 2, the peak RSS of the whole child (`ru_maxrss`), peak minus baseline, and the two
epochs' times and rows/s. Constant memory: the RSS stops growing early in epoch 1 and the peak does
not grow with the length (beyond the eval split, which preparation materialises: 5% of the rows,
memory-mapped).

Prints a Markdown table and one JSON line (prefixed `JSON `).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _images() -> dict[str, tuple[bytes, str]]:
    from PIL import Image

    out = {}
    for name, fmt, colour in (
        ("a.png", "PNG", (200, 30, 30)),
        ("b.jpg", "JPEG", (30, 30, 200)),
        ("c.png", "PNG", (30, 200, 30)),
    ):
        image = Image.new("RGB", (256, 256), colour)
        for y in range(0, 256, 8):  # some structure so the codecs have work to do
            image.paste((y, 255 - y, (y * 3) % 256), (0, y, 256, y + 4))
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        out[f"/{name}"] = (buffer.getvalue(), f"image/{'png' if fmt == 'PNG' else 'jpeg'}")
    return out


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        server: _Server = self.server  # type: ignore[assignment]
        body, content_type = server.images.get(urlsplit(self.path).path, (b"", ""))
        with server.lock:
            server.hits += 1
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", content_type or "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.images = _images()
        self.hits = 0
        self.lock = threading.Lock()


def _write_list(path: Path, port: int, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ("a.png", "b.jpg", "c.png")
    writer = None
    for start in range(0, rows, 10_000):
        stop = min(rows, start + 10_000)
        table = pa.table(
            {
                "uid": [f"{index:032x}" for index in range(start, stop)],
                "url": [f"http://127.0.0.1:{port}/{names[index % 3]}?i={index}" for index in range(start, stop)],
                "text": [f"a striped picture, number {index}" for index in range(start, stop)],
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=5_000)
    if writer is not None:
        writer.close()


def _child(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch  # noqa: F401 - datasets imports it on the first preparation; count it in the baseline
    from datasets import disable_progress_bars

    from theworld_core.config import DataConfig
    from theworld_core.data import prepare_data

    disable_progress_bars()
    baseline = _rss_mib()
    cfg = DataConfig(
        dataset_name=args.list,
        streaming=True,
        max_bad_fraction=0.0,
        fetch_concurrency=args.concurrency,
        fetch_timeout_s=30,
        image_cache_dir=args.cache,
    )
    started = time.perf_counter()
    prepared = prepare_data(cfg, cache_dir=Path(args.cache) / "tables")
    prepare_s = time.perf_counter() - started
    after_prepare = _rss_mib()
    epochs = []
    for _ in range(2):
        started = time.perf_counter()
        count, early_rss = 0, None
        for _ in prepared.train:
            count += 1
            if count == max(1, prepared.stats.total // 10):
                early_rss = _rss_mib()
        seconds = time.perf_counter() - started
        epochs.append({"seconds": seconds, "samples": count, "rss_at_10pct_mib": early_rss, "rss_mib": _rss_mib()})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "RESULT "
        + json.dumps(
            {
                "rows": prepared.stats.total,
                "train": prepared.stats.train,
                "eval": prepared.stats.eval,
                "bad": prepared.stats.bad,
                "baseline_mib": baseline,
                "after_prepare_mib": after_prepare,
                "peak_mib": peak,
                "prepare_s": prepare_s,
                "epochs": epochs,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--list", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    server = _Server()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sizes = {path: len(body) for path, (body, _) in server.images.items()}
    print(
        f"images: {sizes} bytes; concurrency {args.concurrency}; python {sys.version.split()[0]}; {os.cpu_count()} CPUs"
    )
    results = []
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    try:
        for rows in args.lengths:
            listing = work / f"list-{rows}.parquet"
            cache = work / f"cache-{rows}"
            _write_list(listing, server.server_address[1], rows)
            hits_before = server.hits
            command = [
                sys.executable,
                __file__,
                "--child",
                "--list",
                str(listing),
                "--cache",
                str(cache),
                "--concurrency",
                str(args.concurrency),
            ]
            output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            result = json.loads(
                next(line for line in output.splitlines() if line.startswith("RESULT "))[len("RESULT ") :]
            )
            result["fetches"] = server.hits - hits_before
            results.append(result)
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        "| rows | fetches | baseline RSS | after prepare | epoch 1 RSS at 10% / end | epoch 2 RSS end | peak RSS | "
        "peak - baseline | epoch 1 (fetch) | epoch 2 (disk cache) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        one, two = r["epochs"]
        print(
            f"| {r['rows']:,} | {r['fetches']:,} | {r['baseline_mib']:.0f} MiB | {r['after_prepare_mib']:.0f} MiB | "
            f"{one['rss_at_10pct_mib']:.0f} / {one['rss_mib']:.0f} MiB | {two['rss_mib']:.0f} MiB | "
            f"{r['peak_mib']:.0f} MiB | {r['peak_mib'] - r['baseline_mib']:.0f} MiB | "
            f"{one['seconds']:.1f} s ({one['samples'] / one['seconds']:.0f}/s) | "
            f"{two['seconds']:.1f} s ({two['samples'] / two['seconds']:.0f}/s) |"
        )
    print("JSON " + json.dumps({"concurrency": args.concurrency, "results": results}))


if __name__ == "__main__":
    main()
