"""Fetching the images of URL lists: bounded, retried, size-limited and cached on disk.

`fetch_image(url, settings)` is the `load` of every URL-list record:

- **Disk cache first**: `<cache_dir>/<h[:2]>/<h>` with `h = sha256(url)`. A fetched body is written
  to a temporary file in the same folder and renamed into place (atomic: a crash or a concurrent
  fetch of the same URL never leaves half an image), so a second epoch or a rerun does not fetch
  it again. Only complete 2xx bodies are cached; failures are retried on the next pass.
- **HTTP** with `httpx` (one pooled client per process): connect, read, write and pool timeouts of
  `timeout_s` each, plus a deadline of `ATTEMPT_DEADLINE_FACTOR x timeout_s` on a whole attempt
  (headers and body), so a server that trickles bytes cannot hold a worker either.
- **Retries** with `tenacity`, exponential backoff with jitter, on transient failures only
  (timeouts, connection errors, truncated bodies, HTTP 408/425/429/5xx); a 404 is not retried.
- **Size limit**: a `Content-Length` above `max_bytes` is refused before the body is read;
  otherwise the body is streamed and abandoned as soon as it passes the limit.

Every failure raises `SampleProblem(reason, detail)` with a reason of `FETCH_REASONS`; decoding the
bytes (`not_an_image`, `corrupt_image`, ...) happens later, as for local files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from theworld_core.data.types import SampleProblem

log = logging.getLogger(__name__)

FETCH_REASONS: dict[str, str] = {
    "bad_url": "the URL is not an http(s) URL httpx can request",
    "http_404": "the server answered 404 Not Found or 410 Gone (not retried)",
    "http_error": "any other HTTP error status (4xx not retried; 408/425/429/5xx after the retries), "
    "too many redirects, an undecodable body",
    "timeout": "no complete answer within fetch_timeout_s per operation or the attempt deadline, after the retries",
    "connection_error": "DNS failure, connection refused or reset, after the retries",
    "truncated": "the connection closed before the body was complete (shorter than Content-Length), after the retries",
    "too_large": "Content-Length or the received body above fetch_max_bytes",
}
"""Bad-sample reasons of fetching, with what each means."""

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
"""HTTP statuses worth retrying (the server may answer differently a moment later)."""
ATTEMPT_DEADLINE_FACTOR = 3.0
"""One attempt (headers and the whole body) must finish within this many `timeout_s`."""
BACKOFF_MAX_S = 30.0
"""Longest wait between two attempts, however many retries."""
CHUNK_BYTES = 64 * 1024
USER_AGENT = "theworld-multistage/0.1 (image-caption training data fetcher)"


@dataclass(frozen=True)
class FetchSettings:
    """How URL-list images are fetched (from the `fetch_*` and `image_cache_dir` keys of DataConfig)."""

    cache_dir: str
    timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5
    max_bytes: int = 16 * 1024 * 1024
    concurrency: int = 16

    @property
    def max_duration_s(self) -> float:
        """Upper bound on one `fetch_image` call: every attempt at its deadline (plus one operation
        timeout of slack each) and every backoff at its longest. Past it a caller may give up."""
        attempts = self.retries + 1
        per_attempt = (ATTEMPT_DEADLINE_FACTOR + 1) * self.timeout_s
        waits = sum(min(self.backoff_s * 2**n, BACKOFF_MAX_S) + self.backoff_s for n in range(self.retries))
        return attempts * per_attempt + waits + 5.0


class _Failure(SampleProblem):
    """A failed attempt; `transient` ones are retried."""

    def __init__(self, reason: str, detail: str, *, transient: bool) -> None:
        super().__init__(reason, detail)
        self.transient = transient


def cache_path(cache_dir: str | Path, url: str) -> Path:
    """Where the body of `url` is cached: sha256 of the URL, sharded by its first two hex digits."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
    return Path(cache_dir) / digest[:2] / digest


def fetch_image(url: str, settings: FetchSettings) -> bytes:
    """The bytes at `url`, from the disk cache or the network; raises `SampleProblem` on failure."""
    path = cache_path(settings.cache_dir, url)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise SampleProblem("bad_url", f"scheme {scheme!r} in {url[:200]!r} (only http and https are fetched)")
    retrying = Retrying(
        retry=retry_if_exception(lambda error: isinstance(error, _Failure) and error.transient),
        stop=stop_after_attempt(settings.retries + 1),
        wait=wait_exponential_jitter(multiplier=settings.backoff_s, max=BACKOFF_MAX_S, jitter=settings.backoff_s),
        reraise=True,
    )
    try:
        data = retrying(_attempt, _client(settings), url, settings)
    except _Failure as failure:
        attempts = retrying.statistics.get("attempt_number", 1)
        detail = f"{failure.detail} (after {attempts} attempts)" if attempts > 1 else failure.detail
        raise SampleProblem(failure.reason, detail) from None
    _write_atomically(path, data)
    return data


def _attempt(client: httpx.Client, url: str, settings: FetchSettings) -> bytes:
    """One GET: the complete body, or a `_Failure` saying why not and whether to try again."""
    deadline = time.monotonic() + ATTEMPT_DEADLINE_FACTOR * settings.timeout_s
    in_body = False
    try:
        with client.stream("GET", url) as response:
            status = response.status_code
            if status >= 400:
                reason = "http_404" if status in (404, 410) else "http_error"
                raise _Failure(reason, f"HTTP {status}", transient=status in TRANSIENT_STATUS)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > settings.max_bytes:
                raise _Failure(
                    "too_large", f"Content-Length {declared} > fetch_max_bytes={settings.max_bytes}", transient=False
                )
            in_body = True
            body = bytearray()
            for chunk in response.iter_bytes(CHUNK_BYTES):
                body += chunk
                if len(body) > settings.max_bytes:
                    raise _Failure("too_large", f"body passed fetch_max_bytes={settings.max_bytes}", transient=False)
                if time.monotonic() > deadline:
                    raise _Failure(
                        "timeout",
                        f"body not complete within {ATTEMPT_DEADLINE_FACTOR * settings.timeout_s:g}s",
                        transient=True,
                    )
            return bytes(body)
    except _Failure:
        raise
    except httpx.TimeoutException as error:
        raise _Failure("timeout", f"{type(error).__name__} after {settings.timeout_s:g}s", transient=True) from None
    except httpx.RemoteProtocolError as error:
        # In the body: the peer closed before Content-Length bytes came (h11 says so); before it:
        # the server hung up without an answer.
        reason = "truncated" if in_body else "connection_error"
        raise _Failure(reason, _short(error), transient=True) from None
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as error:
        raise _Failure("bad_url", _short(error), transient=False) from None
    except httpx.TransportError as error:  # connect/read/write errors, DNS, proxies
        raise _Failure("connection_error", f"{type(error).__name__}: {_short(error)}", transient=True) from None
    except (httpx.HTTPError, httpx.StreamError) as error:  # too many redirects, a broken gzip body, ...
        raise _Failure("http_error", f"{type(error).__name__}: {_short(error)}", transient=False) from None


def _short(error: BaseException) -> str:
    return str(error)[:300] or type(error).__name__


_clients: dict[tuple[int, float, int], httpx.Client] = {}
_clients_lock = threading.Lock()


def _client(settings: FetchSettings) -> httpx.Client:
    """One connection-pooling client per process and timeout/concurrency (a forked DataLoader
    worker makes its own rather than sharing the parent's sockets)."""
    key = (os.getpid(), settings.timeout_s, settings.concurrency)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = httpx.Client(
                timeout=httpx.Timeout(settings.timeout_s),
                limits=httpx.Limits(
                    max_connections=2 * settings.concurrency, max_keepalive_connections=settings.concurrency
                ),
                follow_redirects=True,
                headers={"User-Agent": USER_AGENT},
            )
            _clients[key] = client
        return client


def _write_atomically(path: Path, data: bytes) -> None:
    """Cache `data` at `path` via a temporary file and a rename; a failed write only costs a refetch."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
        try:
            with handle:
                handle.write(data)
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
    except OSError as error:
        log.warning("could not cache %s in %s: %s", path.name, path.parent, error)
