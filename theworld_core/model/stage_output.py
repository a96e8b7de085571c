"""The stage output: what the next stage and users load.

Contents of a stage output folder (nanoGPT-style explicit, nothing else):

    model.safetensors   every parameter of the components trained so far (never frozen pretrained weights)
    manifest.json       format + version, components included, parameter names and shapes, the base
                        models (ids, revisions, commits), the architecture fingerprint, the model
                        config and the stage config that produced it, and the integrity fields below

Manifest format 2 (`format_version: 2`) adds, for integrity:

    files           {file name: {"sha256": hex, "size": bytes}} for every other file of the folder
                    (a resume state lists its optimizer, scheduler, RNG and trainer-state files too).
                    manifest.json is written last, inside the temporary folder, before the rename.
    fields_sha256   {field: sha256 of its canonical JSON} for every other top-level field and every
                    `model_config` key: an edit after writing is named ("model_config.world_tokens").

and model.safetensors carries, in its header metadata `theworld_architecture`, the values the
weights were trained with (components, architecture fingerprint, the world-branch keys of the
model config), so an edited manifest is refused with what the weights say against what it says.

Loading (`apply_stage_output`, `TheWorld.from_pretrained`) refuses, with a `StageOutputError`
naming the file and what differs (expected vs found):
- a weights file whose size or sha256 is not the manifest's, or whose tensors (names, shapes) are
  not the manifest's `parameters` or not exactly the model's parameters of `components`;
- a manifest field changed after writing, or one that disagrees with the weights header;
- a model of another architecture (fingerprint, or a world-branch key of its config) than the one
  the weights were trained on.
A format 1 manifest (written before these checks, no `files`) is refused: it cannot be verified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from theworld_core.config import ModelConfig
from theworld_core.model.components import COMPONENTS, component_of

FORMAT = "theworld-stage-output"
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
ARCHITECTURE_METADATA = "theworld_architecture"
"""Key of the weights file's header metadata that records what the weights were trained with."""
WORLD_BRANCH_KEYS = ("enable_world", "world_tokens", "max_world_steps", "world_projector")
"""ModelConfig keys that shape what the trained world branch computes but not (all) parameter shapes:
the fingerprint alone would not notice them."""


class StageOutputError(ValueError):
    """A stage output cannot be read, fails its integrity checks, or does not fit the model it is
    loaded onto. `reason` is a short slug (e.g. `sha256-model.safetensors`) used in folder names."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


class DiskFullError(OSError):
    """A save ran out of disk space (ENOSPC or quota). The temporary folder is removed and nothing
    that existed before the save is touched. The message names the folder and the space needed:
    `no space left on <folder>: <what> needs about N MB ...`."""

    def __init__(self, message: str, path: Path, needed_bytes: int):
        super().__init__(errno.ENOSPC, message)
        self.message, self.path, self.needed_bytes = message, Path(path), needed_bytes

    def __str__(self) -> str:
        return self.message


def megabytes(n: int) -> str:
    """`n` bytes in MB (10^6), rounded up, with one decimal under 10 MB."""
    return f"{max(n, 0) / 1e6:.1f}" if n < 10_000_000 else f"{-(-n // 1_000_000)}"


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in `obj` (nested dicts, lists, tuples): a save's size, give or take headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_directory(
    target: Path, *, expected_bytes: int | None = None, what: str | None = None, kept: str = "nothing was replaced"
):
    """A context manager yielding a temporary sibling folder that replaces `target` on success.

    A write that fails for lack of space raises `DiskFullError` saying how much `what` (default:
    the target's name) needs (`expected_bytes`, else what had been written) and `kept` (what is
    left as it was). Any other failure propagates; either way the temporary folder is removed."""
    return _AtomicDirectory(target, expected_bytes, what or target.name, kept)


def _out_of_space(exc: BaseException, free_at_failure: int | None, still_needed: int) -> bool:
    """Whether `exc` comes from a full disk: ENOSPC / EDQUOT anywhere in its chain, or (for writers
    that hide the errno, such as `torch.save`'s "unexpected pos") less free space left than the rest
    of the save needed."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return (
        isinstance(exc, (OSError, RuntimeError))
        and free_at_failure is not None
        and free_at_failure < max(still_needed, 1 << 20)
    )


class _AtomicDirectory:
    def __init__(self, target: Path, expected_bytes: int | None, what: str, kept: str):
        self.target = target
        self.tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.expected_bytes, self.what, self.kept = expected_bytes, what, kept

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._fail(exc)
            return
        try:
            for child in self.tmp.iterdir():  # data reaches the disk before the rename makes it visible
                if child.is_file():
                    with open(child, "rb") as f:
                        os.fsync(f.fileno())
        except OSError as error:
            self._fail(error)
            raise
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _fail(self, exc: BaseException) -> None:
        """Remove the temporary folder; raise `DiskFullError` (from `exc`) when the disk is full."""
        written = sum(p.stat().st_size for p in self.tmp.rglob("*") if p.is_file()) if self.tmp.is_dir() else 0
        try:
            free = shutil.disk_usage(self.tmp.parent).free
        except OSError:
            free = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        needed = max(self.expected_bytes or 0, written)
        if not _out_of_space(exc, free, needed - written):
            return
        free_after = shutil.disk_usage(self.tmp.parent).free
        raise DiskFullError(
            f"no space left on {self.target.parent}: {self.what} needs about {megabytes(needed)} MB and "
            f"{megabytes(free_after)} MB are free; {self.kept}. Free some space (or point output_dir at a larger "
            "disk) and run again",
            self.target.parent,
            needed,
        ) from exc


# ============================================================================== checksums

_verified_hashes: dict[tuple, str] = {}
"""sha256 of files this process already read, keyed by identity and stat: a resume reads each file
twice (once to pick the newest valid state, once to load it) but hashes it once."""


def file_sha256(path: Path, *, remember: bool = True) -> str:
    path = Path(path)
    st = os.stat(path)
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if remember and key in _verified_hashes:
        return _verified_hashes[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    if remember:
        if len(_verified_hashes) > 4096:
            _verified_hashes.clear()
        _verified_hashes[key] = digest.hexdigest()
    return digest.hexdigest()


def sha256_of_files(paths, *, remember: bool = True) -> list[str]:
    """`file_sha256` of each path, in threads (hashlib releases the GIL: weights and optimizer
    state hash side by side)."""
    paths = list(paths)
    if len(paths) <= 1:
        return [file_sha256(p, remember=remember) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda p: file_sha256(p, remember=remember), paths))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _field_values(manifest: dict[str, Any]) -> dict[str, Any]:
    """The sealed fields: every top-level field but the integrity ones, `model_config` key by key."""
    fields: dict[str, Any] = {}
    for key, value in manifest.items():
        if key in ("files", "fields_sha256"):
            continue
        if key == "model_config" and isinstance(value, dict):
            fields.update({f"model_config.{k}": v for k, v in value.items()})
        else:
            fields[key] = value
    return fields


def _field_digests(manifest: dict[str, Any]) -> dict[str, str]:
    return {k: hashlib.sha256(_canonical(v).encode()).hexdigest() for k, v in _field_values(manifest).items()}


def architecture_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the weights file's header records of the manifest (small: the header stays ~300 bytes)."""
    config = manifest.get("model_config") or {}
    return {
        "components": manifest.get("components"),
        "architecture_fingerprint": manifest.get("architecture_fingerprint"),
        **{f"model_config.{k}": config.get(k) for k in WORLD_BRANCH_KEYS},
    }


def save_weights(tensors: dict[str, torch.Tensor], path: Path, manifest: dict[str, Any]) -> None:
    """Write `tensors` with the manifest's architecture record in the header metadata."""
    save_file(
        tensors,
        str(path),
        metadata={"format": FORMAT, ARCHITECTURE_METADATA: _canonical(architecture_record(manifest))},
    )


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Seal `manifest` (field digests, sha256 and size of every other file in `folder`) and write it.

    Call it last, once every other file of the folder is written."""
    folder = Path(folder)
    sealed = dict(manifest)
    paths = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_FILE]
    sealed["files"] = {
        p.name: {"sha256": digest, "size": p.stat().st_size}
        for p, digest in zip(paths, sha256_of_files(paths, remember=False))
    }
    sealed["fields_sha256"] = _field_digests(sealed)
    (folder / MANIFEST_FILE).write_text(json.dumps(sealed, indent=2, sort_keys=True))
    return sealed


# ============================================================================== writing


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a tensor sharded by FSDP (a DTensor: all-gathered, collective), else the tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def stage_output_tensors(model, keep: bool = True) -> dict[str, torch.Tensor]:
    """The parameters a stage output holds: those of `model.trained_components`.

    With a sharded model every rank must call it (each parameter is all-gathered in turn); ranks
    that do not write pass `keep=False` and get an empty dict (no full copy held)."""
    tensors = {}
    for name, param in model.named_parameters():
        if component_of(name) in model.trained_components:
            whole = full_tensor(param.detach())
            if keep:
                tensors[name] = whole.contiguous().cpu()
    return tensors


def build_manifest(model, tensors: dict[str, torch.Tensor], stage_config: dict | None) -> dict[str, Any]:
    """The manifest's descriptive fields (`write_manifest` adds the integrity ones)."""
    import diffusers
    import transformers

    cfg: ModelConfig = model.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "components": [c for c in COMPONENTS if c in model.trained_components],
        "parameters": {name: list(t.shape) for name, t in tensors.items()},
        "base": {
            "gemma": {"id": cfg.model_name, "revision": cfg.model_revision, "commit": model.base_commits.get("gemma")},
            "cosmos": {
                "id": cfg.cosmos_model_name,
                "revision": cfg.cosmos_revision,
                "commit": model.base_commits.get("cosmos"),
            },
        },
        "architecture_fingerprint": model.architecture_fingerprint(),
        "model_config": cfg.model_dump(),
        "stage_config": stage_config,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "diffusers": diffusers.__version__,
        },
    }


def save_stage_output(model, directory: Path, stage_config: dict | None = None, tensors=None) -> Path:
    """Atomically write the stage output of `model` to `directory` (replacing an older one);
    `DiskFullError` when the disk is full (an older stage output there is kept). `tensors`: the
    already gathered `stage_output_tensors(model)` (a sharded model)."""
    tensors = stage_output_tensors(model) if tensors is None else tensors
    manifest = build_manifest(model, tensors, stage_config)
    directory = Path(directory)
    kept = f"the stage output already in {directory.name}/ is kept" if directory.exists() else "nothing was replaced"
    with atomic_directory(
        directory, expected_bytes=tensor_bytes(tensors), what=f"the stage output {directory.name}/", kept=kept
    ) as tmp:
        save_weights(tensors, tmp / WEIGHTS_FILE, manifest)
        write_manifest(tmp, manifest)
    return Path(directory)


# ============================================================================== reading


def checkpoint_folder(source: str | Path) -> Path:
    """A local folder for a stage output given as a folder, an MLflow URI or a hub repo id."""
    text = str(source)
    if text.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        import mlflow

        from theworld_core.tracking.mlflow_runs import configure_tracking

        configure_tracking()  # MLFLOW_TRACKING_URI wins over a store set earlier in this process
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import constants, snapshot_download

        from theworld_core.model.base import hf_token

        try:
            return Path(snapshot_download(repo_id=text, token=hf_token()))
        except Exception as exc:  # re-raised with the value named
            hint = " (HF_HUB_OFFLINE=1: only repos already in the HF cache)" if constants.is_offline_mode() else ""
            raise StageOutputError(
                f"stage output {text!r}: cannot get the hub repo{hint}: {type(exc).__name__}: {exc}"
            ) from exc
    raise StageOutputError(
        f"stage output {text!r} not found: expected a folder, runs:/..., models:/... or a hub repo id"
    )


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest after its format check (the integrity checks are `verify_stage_output`'s)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise StageOutputError(
            f"{directory} is not a stage output: {MANIFEST_FILE} is missing", f"missing-{MANIFEST_FILE}"
        )
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageOutputError(
            f"{path} is not valid JSON ({exc}): the file is corrupt", f"json-{MANIFEST_FILE}"
        ) from exc
    if not isinstance(manifest, dict):
        raise StageOutputError(f"{path} holds a {type(manifest).__name__}, not a JSON object", f"json-{MANIFEST_FILE}")
    if manifest.get("format") == FORMAT and manifest.get("format_version") == 1:
        raise StageOutputError(
            f"{path}: format {FORMAT!r} v1 has no 'files' field (sha256 and size of each file), so its weights "
            f"cannot be verified; it was written before integrity checks (v{FORMAT_VERSION}): train the stage again",
            "format-v1",
        )
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise StageOutputError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} is not "
            f"{FORMAT!r} v{FORMAT_VERSION}",
            "format",
        )
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any], names) -> None:
    """Each of `names` exists in `directory` with the size and sha256 the manifest records."""
    directory = Path(directory)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise StageOutputError(
            f"{directory / MANIFEST_FILE} has no 'files' field (sha256 and size of each file): it cannot be verified",
            "manifest-files",
        )
    names = list(names)
    for name in names:
        path = directory / name
        expected = files.get(name)
        if not isinstance(expected, dict) or not {"sha256", "size"} <= expected.keys():
            raise StageOutputError(
                f"{directory / MANIFEST_FILE} 'files' has no sha256 and size for {name}", f"unlisted-{name}"
            )
        if not path.is_file():
            raise StageOutputError(f"{path} is missing (listed in {MANIFEST_FILE})", f"missing-{name}")
        size = path.stat().st_size
        if size != expected["size"]:
            raise StageOutputError(
                f"{path}: {size} bytes, expected {expected['size']} ({MANIFEST_FILE}): truncated or replaced",
                f"size-{name}",
            )
    for name, found in zip(names, sha256_of_files(directory / n for n in names)):
        if found != files[name]["sha256"]:
            raise StageOutputError(
                f"{directory / name}: sha256 {found}, expected {files[name]['sha256']} "
                f"({MANIFEST_FILE}): the file is corrupt or was changed after it was written",
                f"sha256-{name}",
            )


def _weights_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(tensor name -> shape, metadata) from the header alone, without loading a tensor."""
    try:
        with safe_open(str(path), "pt") as f:
            names = f.keys()
            return {name: list(f.get_slice(name).get_shape()) for name in names}, dict(f.metadata() or {})
    except FileNotFoundError:
        raise StageOutputError(f"{path} is missing", f"missing-{path.name}") from None
    except Exception as exc:  # safetensors raises its own types for a corrupt header
        raise StageOutputError(
            f"{path}: unreadable safetensors header ({type(exc).__name__}: {exc}): the file is corrupt",
            f"header-{path.name}",
        ) from exc


def _names(names, limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_tensor_list(path: Path, found: dict[str, list[int]], expected: dict[str, list[int]], what: str) -> None:
    missing, extra = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing:
        raise StageOutputError(f"{path} lacks tensor(s) {_names(missing)} that {what} lists", f"tensors-{path.name}")
    if extra:
        raise StageOutputError(
            f"{path} holds tensor(s) {_names(extra)} that {what} does not list", f"tensors-{path.name}"
        )
    shapes = [
        f"{n}: expected {expected[n]}, found {found[n]}" for n in sorted(found) if list(found[n]) != list(expected[n])
    ]
    if shapes:
        raise StageOutputError(
            f"{path}: tensor shapes differ from {what}: {'; '.join(shapes[:5])}", f"tensors-{path.name}"
        )


def verify_stage_output(directory: Path, manifest: dict[str, Any], files=(WEIGHTS_FILE,)) -> None:
    """Refuse a stage output whose manifest was edited or whose `files` differ from what was written.

    The weights header is checked first (tensor list, architecture record), so a removed tensor or
    an edited field is named rather than reported as a checksum mismatch; then the field digests,
    then the size and sha256 of each of `files`."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    weights = directory / WEIGHTS_FILE
    if not isinstance(manifest.get("files"), dict):
        verify_files(directory, manifest, [])  # raises: no 'files'
    if not weights.is_file():
        raise StageOutputError(f"{weights} is missing (listed in {MANIFEST_FILE})", f"missing-{WEIGHTS_FILE}")
    shapes, metadata = _weights_header(weights)
    _check_tensor_list(weights, shapes, manifest.get("parameters") or {}, f"{manifest_path} 'parameters'")
    try:
        recorded = json.loads(metadata[ARCHITECTURE_METADATA])
    except (KeyError, json.JSONDecodeError) as exc:
        raise StageOutputError(
            f"{weights}: header metadata has no readable {ARCHITECTURE_METADATA!r} record: "
            "not written by this version, or corrupt",
            f"header-{WEIGHTS_FILE}",
        ) from exc
    claimed = architecture_record(manifest)
    for field, value in recorded.items():
        if _canonical(claimed.get(field)) != _canonical(value):
            raise StageOutputError(
                f"{manifest_path}: field {field} is {claimed.get(field)!r} but {weights} was written "
                f"with {value!r}: the manifest was edited",
                f"field-{field}",
            )
    digests = manifest.get("fields_sha256")
    if not isinstance(digests, dict):
        raise StageOutputError(
            f"{manifest_path} has no 'fields_sha256' field: it cannot be verified", "manifest-fields"
        )
    now = _field_digests(manifest)
    changed = sorted(k for k in now.keys() | digests.keys() if now.get(k) != digests.get(k))
    if changed:
        values = _field_values(manifest)
        detail = "; ".join(f"{k} = {_canonical(values[k])[:80] if k in values else '(removed)'}" for k in changed[:5])
        raise StageOutputError(
            f"{manifest_path}: field(s) changed after the manifest was written (their sha256 in "
            f"'fields_sha256' differs): {detail}",
            f"field-{changed[0]}",
        )
    verify_files(directory, manifest, files)


def _check_fits(model, directory: Path, manifest: dict[str, Any]) -> None:
    """The model is the architecture the saved weights were trained on, and they cover its
    parameters of the saved components exactly."""
    fingerprint = model.architecture_fingerprint()
    own = {name: list(p.shape) for name, p in model.named_parameters()}
    if fingerprint != manifest["architecture_fingerprint"]:
        diffs = [
            f"{name}: saved {shape}, base has {own.get(name, 'nothing')}"
            for name, shape in manifest["parameters"].items()
            if own.get(name) != shape
        ][:3]
        base = manifest["base"]["gemma"]["id"], manifest["base"]["cosmos"]["id"]
        raise StageOutputError(
            f"{directory} was trained on a different base architecture (saved on {base[0]} + {base[1]}, "
            f"fingerprint {manifest['architecture_fingerprint'][:12]}; this base {model.config.model_name} + "
            f"{model.config.cosmos_model_name} has {fingerprint[:12]})" + (": " + "; ".join(diffs) if diffs else ""),
            "architecture",
        )
    saved_config = manifest.get("model_config") or {}
    for key in WORLD_BRANCH_KEYS:
        if key in saved_config and getattr(model.config, key) != saved_config[key]:
            raise StageOutputError(
                f"{directory} was trained with model_config.{key} = {saved_config[key]!r}; the model "
                f"it is loaded onto has {getattr(model.config, key)!r}",
                f"model-{key}",
            )
    unknown = [c for c in manifest["components"] if c not in COMPONENTS]
    if unknown:
        raise StageOutputError(
            f"{directory / MANIFEST_FILE}: components {unknown} are not among {list(COMPONENTS)}", "components"
        )
    expected = {n: s for n, s in own.items() if component_of(n) in manifest["components"]}
    _check_tensor_list(
        Path(directory) / WEIGHTS_FILE,
        manifest["parameters"],
        expected,
        f"the model's parameters of components {manifest['components']}",
    )


def apply_stage_output(model, directory: Path, manifest: dict[str, Any]) -> None:
    """Verify the stage output, check `model` is the architecture it was trained on, copy the tensors in."""
    verify_stage_output(directory, manifest)
    _check_fits(model, directory, manifest)
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    model.trained_components = set(manifest["components"])


def load_stage_output(cls, source, dtype=None, overrides: dict | None = None):
    directory = checkpoint_folder(source)
    manifest = read_manifest(directory)
    verify_stage_output(directory, manifest)  # before the (slow) base build
    config = ModelConfig(**{**manifest["model_config"], **(overrides or {})})
    model = cls.from_base(config, dtype=dtype)
    apply_stage_output(model, directory, manifest)
    return model


def is_intact_stage_output(directory: Path) -> bool:
    """True when `directory` holds a stage output that passes `verify_stage_output` (no model needed)."""
    try:
        verify_stage_output(directory, read_manifest(directory))
        return True
    except (StageOutputError, OSError):
        return False
