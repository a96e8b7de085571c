"""The feature cache: outputs of frozen encoders on disk, so a stage encodes each image once.

In stage 1 the SigLIP tower + multi-modal projector and the Cosmos VAE encoder do not train, yet
they cost about half the FLOPs of a step. Their outputs depend only on the image, the preprocessing
and the encoder's weights, so they are stored here and read back on the next epoch, the next stage
or the next pipeline run.

An entry is one tensor for one image and one `Namespace` (kind + encoder fingerprint + preprocessing
settings). Its file name is the sha256 of (namespace, image key); a changed encoder or preprocessing
gives other names, so old entries are never hit and age out through LRU eviction.

Layout: `<directory>/v1/<kind>/<2 hex>/<sha256>.bin`. One entry file:

    b"TWFEAT1\\n" | header length (u32 LE) | header JSON | raw tensor bytes | sha256 of all before (32 B)

The header names the namespace, image key, dtype, shape and the measured encode time. A read checks
the checksum (a corrupt or truncated file is dropped, counted and re-encoded, never returned) and
the namespace and image key (an entry of another encoder under this name turns the cache off).

Concurrency: writes go to a unique temp file then `os.replace`, so readers see a whole entry or
none, and two writers of one key leave one whole entry. Recency is the file's mtime, touched on each
hit. Eviction (oldest mtime first, down to 90% of the cap) holds an `flock`, so processes trim one
after the other. Each process scans the folder after writing 5% of the cap (or when its estimate
passes the cap), so with N writers the folder passes the cap by at most N x 5% until the next
write trims it. (flock needs a local filesystem; on NFS two evictors may both trim, which removes
more than needed but never a half-written entry.)

Failures never stop training: a folder that cannot be created or written, a full disk, or entries
that belong to another encoder log one warning and turn the cache off (every lookup misses, nothing
is written), so the stage goes on encoding every image.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("theworld.feature_cache")

FORMAT_VERSION = 1
KINDS = ("vision", "vae_latent")
"""`vision`: SigLIP + multi-modal projector output of one image, (mm_tokens_per_image, text hidden).
`vae_latent`: the normalised VAE latent before pooling, (z_dim, 1, S/8, S/8), so `world_tokens` may change."""
MODES = ("auto", "off")
DEFAULT_MAX_GB = 50.0

_MAGIC = b"TWFEAT1\n"
_PREFIX = len(_MAGIC) + 4
_DIGEST = 32
ENTRY_OVERHEAD_BYTES = 512
"""Upper bound on an entry's bytes besides the tensor (magic, header JSON, checksum)."""
_LOW_WATERMARK = 0.9
_RESCAN_FRACTION = 0.05
_STALE_TEMP_SECONDS = 3600  # temp files of writers that died; live writers finish in milliseconds
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def default_cache_dir() -> Path:
    """`<project state folder>/feature_cache` (the project folder of tracking.mlflow_runs)."""
    from theworld_core.tracking.mlflow_runs import project_dir

    return project_dir() / "feature_cache"


@dataclass(frozen=True)
class Namespace:
    """What entries of one kind are valid for: the encoder's weights and the preprocessing."""

    kind: str
    digest: str
    description: str  # the JSON that was hashed, for messages


def make_namespace(kind: str, encoder_fingerprint: str, settings: Mapping[str, Any]) -> Namespace:
    """Namespace of `kind` entries made by the encoder with `encoder_fingerprint` under `settings`."""
    if kind not in KINDS:
        raise ValueError(f"feature cache kind {kind!r} is not allowed: use one of {list(KINDS)}")
    description = json.dumps(
        {"format": FORMAT_VERSION, "kind": kind, "encoder": encoder_fingerprint, "settings": dict(settings)},
        sort_keys=True,
        default=str,
    )
    return Namespace(kind, hashlib.sha256(description.encode()).hexdigest(), description)


class _Corrupt(Exception):
    """The entry file is damaged (bad magic, checksum, header or length)."""


class _Foreign(Exception):
    """A sound entry that belongs to another namespace or image than its name says."""


def encode_entry(namespace: Namespace, image_key: str, tensor: torch.Tensor, encode_seconds: float | None) -> bytes:
    """The bytes of one entry file (tensor bytes exactly as in memory: bit-exact round trip)."""
    tensor = tensor.detach().to("cpu").contiguous()
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ValueError(f"feature cache stores {sorted(_DTYPES)} tensors, not {dtype}")
    payload = tensor_bytes(tensor)
    header = json.dumps(
        {
            "namespace": namespace.digest,
            "kind": namespace.kind,
            "image_key": image_key,
            "dtype": dtype,
            "shape": list(tensor.shape),
            "payload_bytes": len(payload),
            "encode_seconds": encode_seconds,
        },
        sort_keys=True,
    ).encode()
    body = _MAGIC + struct.pack("<I", len(header)) + header + payload
    return body + hashlib.sha256(body).digest()


def decode_entry(data: bytes, namespace: Namespace, image_key: str) -> tuple[torch.Tensor, dict]:
    """(tensor, header) of an entry file; `_Corrupt` if damaged, `_Foreign` if another key's."""
    view = memoryview(data)
    if len(data) < _PREFIX + _DIGEST or not data.startswith(_MAGIC):
        raise _Corrupt(f"{len(data)} bytes without the entry header (truncated or not an entry)")
    if hashlib.sha256(view[:-_DIGEST]).digest() != view[-_DIGEST:]:
        raise _Corrupt("checksum mismatch (truncated or damaged)")
    try:
        (header_length,) = struct.unpack_from("<I", data, len(_MAGIC))
        header = json.loads(bytes(view[_PREFIX : _PREFIX + header_length]))
        payload = view[_PREFIX + header_length : -_DIGEST]
        dtype, shape = _DTYPES[header["dtype"]], tuple(header["shape"])
    except (ValueError, KeyError, TypeError, struct.error) as error:
        raise _Corrupt(f"unreadable header: {type(error).__name__}: {error}") from None
    if header.get("namespace") != namespace.digest or header.get("image_key") != image_key:
        raise _Foreign(
            f"it holds kind={header.get('kind')!r} namespace {str(header.get('namespace'))[:12]} "
            f"image {str(header.get('image_key'))[:12]}"
        )
    if len(payload) != header.get("payload_bytes") or len(payload) != dtype.itemsize * _numel(shape):
        raise _Corrupt(f"{len(payload)} tensor bytes for dtype {header['dtype']} shape {list(shape)}")
    return tensor_from_bytes(payload, dtype, shape), header


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A CPU tensor's bytes exactly as in memory (any dtype, bf16 included)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes | memoryview, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of `tensor_bytes`: a writable tensor over a copy of `data`."""
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(tuple(shape))


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for side in shape:
        count *= int(side)
    return count


def describe_os_error(error: OSError, path: Path) -> str:
    """Why a folder cannot hold the cache, in words a user can act on."""
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "the disk (or quota) holding it is full"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = "it is not writable"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        what = "a file stands where a folder is needed"
    else:
        what = "it cannot be written"
    return f"{what} ({type(error).__name__} [{errno.errorcode.get(code, code)}] at {error.filename or path})"


class FeatureCache:
    """Encoder outputs on disk with a size cap, LRU eviction, checksums and stats.

    `mode`: `auto` uses the cache when the folder works, `off` never touches disk. `directory`:
    default `default_cache_dir()`. `max_gb`: cap in gigabytes (10^9 bytes) on the entries of this format.
    """

    def __init__(self, directory: str | Path | None = None, *, max_gb: float = DEFAULT_MAX_GB, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"feature_cache={mode!r} is not allowed: use one of {list(MODES)}")
        if not isinstance(max_gb, (int, float)) or isinstance(max_gb, bool) or not max_gb > 0:
            raise ValueError(f"feature_cache_max_gb={max_gb!r} is not allowed: use a number of gigabytes > 0")
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.root = self.directory / f"v{FORMAT_VERSION}"
        self.max_bytes = int(max_gb * 1e9)
        self.disabled_reason: str | None = None
        # Counters change in the training thread and in the background writer
        # (encoders.CachedEncoders): every update holds the lock.
        self._lock = threading.Lock()
        self._reset_counts()
        self._known_size: int | None = None  # folder size at the last scan; None before the first
        self._written_since_scan = 0
        self._folders: set[str] = set()  # shard folders this process made or found
        if mode == "off":
            self.disabled_reason = "feature_cache=off"
        else:
            self._check_writable()

    def _reset_counts(self) -> None:
        self._hits = dict.fromkeys(KINDS, 0)
        self._misses = dict.fromkeys(KINDS, 0)
        self._corrupt = self._bytes_written = self._bytes_read = self._evictions = 0
        self._encode_seconds = self._seconds_saved = 0.0
        self._encoded_items = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]  # a lock does not pickle (DataLoader workers get a `reader()`)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ workers

    def reader(self) -> FeatureCache:
        """A copy for a DataLoader worker: reads and checks entries as `get` does (a damaged one is
        dropped and counted), counts from zero, and hands its counts over with `take_counts`; it is
        never asked to write."""
        copy = FeatureCache.__new__(FeatureCache)
        copy.__setstate__(self.__getstate__())
        copy._reset_counts()
        return copy

    def take_counts(self) -> dict[str, Any]:
        """The read counts since the last call (then zero), and why this copy turned itself off."""
        with self._lock:
            counts = {
                "hits": dict(self._hits),
                "misses": dict(self._misses),
                "corrupt": self._corrupt,
                "bytes_read": self._bytes_read,
                "seconds_saved": self._seconds_saved,
                "disabled_reason": self.disabled_reason,
            }
            self._reset_counts()
        return counts

    def add_counts(self, counts: Mapping[str, Any]) -> None:
        """Add a worker's `take_counts()`; a worker that found entries of another model turns this off too."""
        with self._lock:
            for kind in KINDS:
                self._hits[kind] += counts["hits"][kind]
                self._misses[kind] += counts["misses"][kind]
            self._corrupt += counts["corrupt"]
            self._bytes_read += counts["bytes_read"]
            self._seconds_saved += counts["seconds_saved"]
        if counts["disabled_reason"] is not None:
            self.disable(f"{counts['disabled_reason']} (found by a DataLoader worker)")

    # ------------------------------------------------------------------ state

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    def disable(self, reason: str) -> None:
        """Turn the cache off for the rest of this process, with one warning."""
        if self.disabled_reason is not None:
            return
        self.disabled_reason = reason
        log.warning(
            "feature cache at %s turned off: %s. Training goes on without it: every image is encoded "
            "and nothing is cached (fix the folder, or set feature_cache_dir / feature_cache: off).",
            self.directory,
            reason,
        )

    def _check_writable(self) -> None:
        probe = self.root / f".probe-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(probe, "xb") as handle:
                handle.write(b"probe")
            probe.unlink()
        except OSError as error:
            _remove_quietly(probe)
            self.disable(describe_os_error(error, self.directory))

    def path_of(self, namespace: Namespace, image_key: str) -> Path:
        name = hashlib.sha256(f"{namespace.digest}/{image_key}".encode()).hexdigest()
        return self.root / namespace.kind / name[:2] / f"{name}.bin"

    # ------------------------------------------------------------------ entries

    def get(
        self,
        namespace: Namespace,
        image_key: str,
        *,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor | None:
        """The cached tensor, or None (a miss). `shape`/`dtype`: what this encoder makes, if known."""
        tensor = self._read(namespace, image_key, shape, dtype)
        with self._lock:
            if tensor is None:
                self._misses[namespace.kind] += 1
            else:
                self._hits[namespace.kind] += 1
        return tensor

    def _read(self, namespace, image_key, shape, dtype) -> torch.Tensor | None:
        if not self.enabled:
            return None
        path = self.path_of(namespace, image_key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            self.disable(f"cannot read {path}: {describe_os_error(error, path)}")
            return None
        try:
            tensor, header = decode_entry(data, namespace, image_key)
        except _Corrupt as problem:
            with self._lock:
                self._corrupt += 1
                first = self._corrupt == 1
            if first:
                log.warning(
                    "feature cache: dropped corrupt entry %s (%s); it is encoded again "
                    "(further corrupt entries are counted in train/feature_cache/corrupt)",
                    path,
                    problem,
                )
            _remove_quietly(path)
            return None
        except _Foreign as problem:
            self.disable(
                f"entry {path} does not belong to the encoder and image it is filed under: {problem}; "
                "the folder holds entries of another base model or cache version"
            )
            return None
        if (shape is not None and tuple(tensor.shape) != tuple(shape)) or (dtype is not None and tensor.dtype != dtype):
            self.disable(
                f"entry {path} holds a {tuple(tensor.shape)} {tensor.dtype} tensor where this encoder "
                f"makes {tuple(shape) if shape is not None else 'any shape'} {dtype or ''}; "
                "the folder holds entries of another base model"
            )
            return None
        try:
            os.utime(path)  # recency for LRU eviction
        except OSError:
            pass
        with self._lock:
            self._bytes_read += len(data)
            self._seconds_saved += header.get("encode_seconds") or self._mean_encode_seconds()
        return tensor

    def put(
        self, namespace: Namespace, image_key: str, tensor: torch.Tensor, encode_seconds: float | None = None
    ) -> bool:
        """Store one entry atomically; False when the cache is off or an equal entry exists."""
        if not self.enabled:
            return False
        path = str(self.path_of(namespace, image_key))
        if os.path.exists(path):  # another process (or an earlier batch) wrote it
            return False
        data = encode_entry(namespace, image_key, tensor, encode_seconds)
        folder, name = os.path.split(path)
        temp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            self._write_new(folder, temp, data)
            os.replace(temp, path)
        except OSError as error:
            _remove_quietly(temp)
            self.disable(describe_os_error(error, self.directory))
            return False
        with self._lock:
            self._bytes_written += len(data)
            self._written_since_scan += len(data)
        self._maybe_evict()
        return True

    def _write_new(self, folder: str, temp: str, data: bytes) -> None:
        """Write `data` to the new file `temp` in `folder`, creating the folder once per process (in a
        stage's first epoch a mkdir per entry took a quarter of the writer's time)."""
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        new_file = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            handle = os.open(temp, new_file, 0o644)
        except FileNotFoundError:  # the folder was removed meanwhile (a user cleaning up): once more
            os.makedirs(folder, exist_ok=True)
            handle = os.open(temp, new_file, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(handle, view) :]
        finally:
            os.close(handle)

    def get_or_encode(
        self,
        namespace: Namespace,
        image_keys: Sequence[str],
        inputs: torch.Tensor,
        encode: Callable[[torch.Tensor], torch.Tensor],
        *,
        item_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """`encode(inputs)` for a batch, reading hits from disk and encoding (then storing) only misses.

        `inputs[i]` is the preprocessed image whose content key is `image_keys[i]`; the result has
        the batch order and lies on `inputs.device`.
        """
        if len(image_keys) != inputs.shape[0]:
            raise ValueError(f"{len(image_keys)} image keys for a batch of {inputs.shape[0]} inputs")
        found = [self.get(namespace, key, shape=item_shape) for key in image_keys]
        missing = [i for i, tensor in enumerate(found) if tensor is None]
        encoded = None
        if missing:
            started = time.perf_counter()
            encoded = encode(inputs if len(missing) == len(found) else inputs[missing])
            on_cpu = encoded.detach().to("cpu")  # waits for the device, so the time is the encoder's
            self.store(namespace, [image_keys[i] for i in missing], on_cpu, time.perf_counter() - started)
            if len(missing) == len(found):
                return encoded
        hit_rows = [i for i, tensor in enumerate(found) if tensor is not None]
        hits = torch.stack([found[i] for i in hit_rows])
        if encoded is not None and (hits.shape[1:] != encoded.shape[1:] or hits.dtype != encoded.dtype):
            self.disable(
                f"cached {namespace.kind} entries are {tuple(hits.shape[1:])} {hits.dtype} but the encoder "
                f"makes {tuple(encoded.shape[1:])} {encoded.dtype}; the folder holds entries of another setup"
            )
            return encode(inputs)
        result = torch.empty((len(found), *hits.shape[1:]), dtype=hits.dtype, device=inputs.device)
        result[hit_rows] = hits.to(inputs.device)
        if encoded is not None:
            result[missing] = encoded
        return result

    def store(self, namespace: Namespace, image_keys: Sequence[str], encoded: torch.Tensor, seconds: float) -> None:
        """Put row i of `encoded` (on the host) under `image_keys[i]`; `seconds`: the batch's encode time."""
        with self._lock:
            self._encode_seconds += seconds
            self._encoded_items += len(image_keys)
        for row, key in enumerate(image_keys):
            self.put(namespace, key, encoded[row], seconds / max(1, len(image_keys)))

    def _mean_encode_seconds(self) -> float:
        return self._encode_seconds / self._encoded_items if self._encoded_items else 0.0

    # ------------------------------------------------------------------ size cap

    def _maybe_evict(self) -> None:
        if (
            self._known_size is None
            or self._known_size + self._written_since_scan > self.max_bytes
            or self._written_since_scan > self.max_bytes * _RESCAN_FRACTION
        ):
            self.evict()

    def evict(self) -> int:
        """Trim the folder to 90% of the cap, least recently used first; returns entries removed.

        Evictors take turns (an exclusive flock): each scans after the previous one finished, so
        the last writer's trim sees every entry written before it.
        """
        if not self.enabled:
            return 0
        try:
            lock = os.open(self.root / ".evict.lock", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError:
            return 0
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._scan()
            total = sum(size for _, size, _ in entries)
            removed = 0
            if total > self.max_bytes:
                target = self.max_bytes * _LOW_WATERMARK
                for _, size, path in sorted(entries):
                    if total <= target:
                        break
                    try:
                        os.unlink(path)
                        removed += 1
                    except FileNotFoundError:
                        pass  # dropped as corrupt by a reader meanwhile
                    except OSError:
                        break
                    total -= size
            with self._lock:
                self._evictions += removed
                self._known_size, self._written_since_scan = total, 0
            return removed
        finally:
            os.close(lock)  # releases the flock

    def _scan(self) -> list[tuple[int, int, str]]:
        """(mtime_ns, size, path) of every entry; removes temp files left by dead writers."""
        entries, now = [], time.time()
        for kind in KINDS:
            for shard in _scandir(self.root / kind):
                if not shard.is_dir(follow_symlinks=False):
                    continue
                for item in _scandir(shard.path):
                    try:
                        info = item.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed meanwhile
                    if item.name.endswith(".bin"):
                        entries.append((info.st_mtime_ns, info.st_size, item.path))
                    elif item.name.endswith(".tmp") and now - info.st_mtime > _STALE_TEMP_SECONDS:
                        _remove_quietly(Path(item.path))
        return entries

    def size_bytes(self) -> int:
        """Bytes the entries take now (a scan of the folder)."""
        return sum(size for _, size, _ in self._scan()) if self.root.is_dir() else 0

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, float]:
        """Counters of this process, named for MLflow (`train/feature_cache/...`)."""
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, float]:
        hits, misses = sum(self._hits.values()), sum(self._misses.values())
        metrics = {
            "train/feature_cache/enabled": float(self.enabled),
            "train/feature_cache/hits": float(hits),
            "train/feature_cache/misses": float(misses),
            "train/feature_cache/hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "train/feature_cache/corrupt": float(self._corrupt),
            "train/feature_cache/bytes_written": float(self._bytes_written),
            "train/feature_cache/bytes_read": float(self._bytes_read),
            "train/feature_cache/evictions": float(self._evictions),
            "train/feature_cache/encode_seconds": self._encode_seconds,
            "train/feature_cache/encode_seconds_saved": self._seconds_saved,
        }
        for kind in KINDS:
            metrics[f"train/feature_cache/{kind}/hits"] = float(self._hits[kind])
            metrics[f"train/feature_cache/{kind}/misses"] = float(self._misses[kind])
        return metrics


def _scandir(path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as items:
            return list(items)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
