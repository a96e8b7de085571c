"""The feature cache: what a user relies on before letting it replace the frozen encoders.

Exact round trips, keys that follow the encoder's weights and the preprocessing, damaged entries
that are re-encoded and never returned, LRU eviction under the cap, two processes sharing one
folder, folders that cannot be written (or hold another model's entries) turning the cache off,
and the counters that go to MLflow.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stage_helpers import Calls

from theworld_core.config import ModelConfig
from theworld_core.features.cache import ENTRY_OVERHEAD_BYTES, FeatureCache, decode_entry, make_namespace
from theworld_core.features.encoders import CachedEncoders
from theworld_core.features.keys import (
    bytes_per_sample,
    encoder_fingerprint,
    image_key,
    vision_settings,
    world_settings,
)
from theworld_core.model.components import SEED_STAGES, trainable_components
from theworld_core.model.precision import apply_precision, resolve_precision
from theworld_core.model.theworld import TheWorld

REPO = Path(__file__).resolve().parents[1]
# `shared/` sits beside the repository (CI, the lead's checkout) or beside the worktrees' folder.
SHARED = next(
    (p / "shared" for p in (REPO.parent, REPO.parent.parent) if (p / "shared").is_dir()), REPO.parent / "shared"
)
LOGGER = "theworld.feature_cache"


def _image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _stage(model: TheWorld, stage: str) -> TheWorld:
    model.set_trainable(trainable_components(SEED_STAGES[stage]))
    return model


class CountingEncoder:
    """A real (deterministic) encoder that records how many rows it was asked to encode."""

    def __init__(self):
        self.rows = 0

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        self.rows += inputs.shape[0]
        return torch.tanh(inputs.float() * 3.0) + 0.5


NS = make_namespace("vision", "f" * 64, {"size": 32})


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model(tiny_paths) -> TheWorld:
    """The tiny TheWorld in stage 1, its multi-modal projector made non-zero (as in test_model.py),
    so vision features carry the image and not all zeros."""
    config = ModelConfig(
        model_name=str(tiny_paths.gemma), cosmos_model_name=str(tiny_paths.cosmos), world_tokens=4, world_image_size=32
    )
    torch.manual_seed(0)
    built = TheWorld.from_base(config).eval()
    # As the trainer holds it on a CPU: the precision policy puts every component in fp32.
    apply_precision(built, resolve_precision("no", "cpu"), ("world_projector",))
    with torch.no_grad():
        built.gemma.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return _stage(built, "stage1_projection")


def _batch(model: TheWorld, images: list[Image.Image]) -> dict:
    builder = model.builder
    batch = builder.collate([builder.encode(image, "What is shown?", "shapes") for image in images])
    batch["image_keys"] = [image_key(image) for image in images]
    return batch


# ------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_put_get_round_trip_is_bit_for_bit(tmp_path, dtype) -> None:
    cache = FeatureCache(tmp_path)
    torch.manual_seed(1)
    tensor = torch.randn(4, 7).to(dtype)
    tensor[0, 0], tensor[0, 1], tensor[0, 2] = float("nan"), -0.0, float("inf")
    assert cache.put(NS, "image-a", tensor, encode_seconds=0.25)
    back = cache.get(NS, "image-a")
    assert back.dtype == dtype and back.shape == tensor.shape
    assert _bits(back) == _bits(tensor)
    assert cache.get(NS, "image-b") is None


def test_tiny_model_features_come_back_exactly(model, tmp_path) -> None:
    cache = FeatureCache(tmp_path)
    encoders = CachedEncoders(model, cache)
    assert encoders.kinds == ("vision", "vae_latent")
    images = [_image(0), _image(1), _image(2)]
    batch = _batch(model, images)
    direct_vision = encoders.encode_vision(batch["pixel_values"])
    direct_world = encoders.encode_world(batch["world_pixel_values"])
    assert direct_vision.abs().sum() > 0 and direct_world.abs().sum() > 0

    first = encoders.fill(batch)
    assert "pixel_values" not in first and "world_pixel_values" not in first and "image_keys" not in first
    assert _bits(first["image_features"]) == _bits(direct_vision)
    assert _bits(first["world_latents"]) == _bits(direct_world)
    assert first["image_features"].shape == (3, *encoders.item_shapes["vision"])
    assert first["world_latents"].shape == (3, *encoders.item_shapes["vae_latent"])
    assert cache.stats()["train/feature_cache/misses"] == 6 and cache.stats()["train/feature_cache/hits"] == 0

    second = encoders.fill(batch)
    assert _bits(second["image_features"]) == _bits(direct_vision)
    assert _bits(second["world_latents"]) == _bits(direct_world)
    assert cache.stats()["train/feature_cache/hits"] == 6

    # A batch mixing cached and new images: hits keep their rows, the new image is encoded.
    mixed = encoders.fill(_batch(model, [images[2], _image(3), images[0]]))
    assert _bits(mixed["image_features"][0]) == _bits(direct_vision[2])
    assert _bits(mixed["image_features"][2]) == _bits(direct_vision[0])
    alone = encoders.encode_vision(_batch(model, [_image(3)])["pixel_values"])
    torch.testing.assert_close(mixed["image_features"][1:2], alone)
    assert (
        cache.stats()["train/feature_cache/vision/hits"] == 5
        and cache.stats()["train/feature_cache/vision/misses"] == 4
    )


def test_only_frozen_encoders_are_cached(tiny_paths, tmp_path) -> None:
    config = ModelConfig(
        model_name=str(tiny_paths.gemma), cosmos_model_name=str(tiny_paths.cosmos), world_tokens=4, world_image_size=32
    )
    model = TheWorld.from_base(config).eval()
    cache = FeatureCache(tmp_path)
    assert CachedEncoders(_stage(model, "stage2_vision"), cache).kinds == ("vae_latent",)
    assert CachedEncoders(_stage(model, "stage3_language"), cache).kinds == ("vae_latent",)
    everything = CachedEncoders(_stage(model, "stage4_full"), cache)
    assert everything.kinds == ()
    batch = _batch(model, [_image(0)])
    filled = everything.fill(batch)
    assert torch.equal(filled["pixel_values"], batch["pixel_values"]) and "image_keys" not in filled


# ------------------------------------------------------------------------------------ keys


def test_image_key_follows_the_pixels(tmp_path) -> None:
    image = _image(5)
    image.save(tmp_path / "a.png")
    assert image_key(Image.open(tmp_path / "a.png")) == image_key(image)  # same pixels, other source
    changed = image.copy()
    changed.putpixel((0, 0), tuple((v + 1) % 256 for v in image.getpixel((0, 0))))
    assert image_key(changed) != image_key(image)
    gray = image.convert("L")
    assert image_key(gray) == image_key(gray.convert("RGB"))  # the RGB the encoders see
    flat = np.zeros((2, 6, 3), dtype=np.uint8)
    assert image_key(Image.fromarray(flat)) != image_key(Image.fromarray(flat.reshape(6, 2, 3)))


def test_fingerprint_follows_the_weights(model, tiny_paths) -> None:
    from theworld_core.model.base import load_vae
    from theworld_core.model.world import VaeEncoder

    vae_fingerprint = encoder_fingerprint(model.vae)
    assert encoder_fingerprint(model.vae) == vae_fingerprint
    reloaded = VaeEncoder.from_autoencoder(load_vae(str(tiny_paths.cosmos)))
    assert encoder_fingerprint(reloaded) == vae_fingerprint  # a fresh load of the same base

    one_bit = copy.deepcopy(model.vae)
    with torch.no_grad():
        weight = one_bit.quant_conv.weight
        weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(float("inf")))
    assert encoder_fingerprint(one_bit) != vae_fingerprint
    assert encoder_fingerprint(copy.deepcopy(model.vae).to(torch.bfloat16)) != vae_fingerprint
    other_buffer = copy.deepcopy(model.vae)
    other_buffer.latents_std.mul_(2)
    assert encoder_fingerprint(other_buffer) != vae_fingerprint

    vision = {
        "vision_tower": model.gemma.model.vision_tower,
        "multi_modal_projector": model.gemma.model.multi_modal_projector,
    }
    assert encoder_fingerprint(vision) != encoder_fingerprint({"vision_tower": model.gemma.model.vision_tower})


def test_namespace_follows_preprocessing(model) -> None:
    fingerprint = "a" * 64
    base = make_namespace("vae_latent", fingerprint, world_settings(32, "no"))
    assert make_namespace("vae_latent", fingerprint, world_settings(32, "no")) == base
    assert make_namespace("vae_latent", fingerprint, world_settings(64, "no")).digest != base.digest
    assert make_namespace("vae_latent", fingerprint, world_settings(32, "bf16")).digest != base.digest
    assert make_namespace("vae_latent", "b" * 64, world_settings(32, "no")).digest != base.digest
    assert make_namespace("vision", fingerprint, world_settings(32, "no")).digest != base.digest

    vision = make_namespace("vision", fingerprint, vision_settings(model.processor, "no"))
    for key, value in [("size", {"height": 64, "width": 64}), ("image_mean", [0.4, 0.5, 0.5]), ("resample", 3)]:
        processor = copy.deepcopy(model.processor)
        setattr(processor.image_processor, key, value)
        assert make_namespace("vision", fingerprint, vision_settings(processor, "no")).digest != vision.digest, key
    with pytest.raises(ValueError, match="kind 'text' is not allowed"):
        make_namespace("text", fingerprint, {})


def test_changed_encoder_never_hits_old_entries(model, tmp_path) -> None:
    cache = FeatureCache(tmp_path)
    batch = _batch(model, [_image(0), _image(1)])
    CachedEncoders(model, cache).fill(batch)
    trained = copy.deepcopy(model)
    with torch.no_grad():
        trained.vae.quant_conv.bias.add_(0.5)  # as stage 4 would change the VAE
    second = CachedEncoders(trained, cache)
    filled = second.fill(batch)
    stats = cache.stats()
    assert stats["train/feature_cache/vision/hits"] == 2  # the vision tower did not change
    assert stats["train/feature_cache/vae_latent/hits"] == 0 and stats["train/feature_cache/vae_latent/misses"] == 4
    assert _bits(filled["world_latents"]) == _bits(second.encode_world(batch["world_pixel_values"]))


# ------------------------------------------------------------------------------------ damage


def _flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "bit flip": _flip_payload_byte,
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "empty": lambda path: path.write_bytes(b""),
    "not an entry": lambda path: path.write_bytes(b"<html>proxy error</html>" * 20),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_dropped_and_encoded_again(tmp_path, damage, caplog) -> None:
    cache, encoder = FeatureCache(tmp_path), CountingEncoder()
    inputs = torch.linspace(-1, 1, 2 * 16).reshape(2, 16)
    expected = cache.get_or_encode(NS, ["k0", "k1"], inputs, encoder)
    path = cache.path_of(NS, "k0")
    DAMAGE[damage](path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.get(NS, "k0") is None
    assert not path.exists()
    assert "dropped corrupt entry" in caplog.text
    stats = cache.stats()
    assert stats["train/feature_cache/corrupt"] == 1 and stats["train/feature_cache/misses"] == 3
    assert stats["train/feature_cache/enabled"] == 1.0

    again = cache.get_or_encode(NS, ["k0", "k1"], inputs, encoder)
    assert encoder.rows == 3  # 2 first, then only the dropped one
    assert _bits(again) == _bits(expected)
    assert _bits(cache.get(NS, "k0")) == _bits(expected[0])  # rewritten whole


# ------------------------------------------------------------------------------------ eviction


def test_least_recently_used_entries_are_evicted_under_the_cap(tmp_path) -> None:
    probe = FeatureCache(tmp_path / "probe")
    probe.put(NS, "key00", torch.zeros(1000))
    entry_bytes = probe.path_of(NS, "key00").stat().st_size

    cap = entry_bytes * 10.5
    cache = FeatureCache(tmp_path / "cache", max_gb=cap / 1e9)
    keys = [f"key{i:02d}" for i in range(12)]
    now = time.time()
    for i, key in enumerate(keys[:10]):
        assert cache.put(NS, key, torch.full((1000,), float(i)))
        os.utime(cache.path_of(NS, key), (now - 1000 + i, now - 1000 + i))  # key00 oldest
    assert cache.stats()["train/feature_cache/evictions"] == 0
    assert cache.get(NS, "key00") is not None  # a hit makes key00 the most recent

    for i, key in enumerate(keys[10:], start=10):
        cache.put(NS, key, torch.full((1000,), float(i)))
    present = [key for key in keys if cache.path_of(NS, key).exists()]
    assert present == ["key00"] + keys[3:]  # key01 and key02 were the least recently used
    assert cache.stats()["train/feature_cache/evictions"] == 2
    assert cache.size_bytes() <= cap


CONCURRENT_WRITER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    from theworld_core.features.cache import FeatureCache, make_namespace

    directory, writer, rounds, cap_gb = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    cache = FeatureCache(directory, max_gb=cap_gb)
    namespace = make_namespace("vision", "c" * 64, {"size": 32})
    keys = [f"image{i:02d}" for i in range(16)]
    # Opposite orders: each writer soon reads keys the other just wrote, whichever of them runs ahead
    # (in one order the leader would only ever miss).
    order = list(enumerate(keys)) if writer == 0 else list(enumerate(keys))[::-1]
    payload = lambda who, i: torch.full((64, 256), float(1000 * who + i))  # 64 KiB; each writer its own values
    (directory.parent / f"ready{writer}").touch()  # imported and set up: the test starts both at once
    go = directory.parent / "go"
    while not go.exists():
        time.sleep(0.01)
    foreign = 0
    for _ in range(rounds):
        for i, key in order:
            found = cache.get(namespace, key)
            if found is None:
                cache.put(namespace, key, payload(writer, i))
            elif not (torch.equal(found, payload(0, i)) or torch.equal(found, payload(1, i))):
                foreign += 1
    print(json.dumps({"foreign": foreign, **cache.stats()}))
""")


def test_two_processes_share_one_folder_without_damage(tmp_path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(CONCURRENT_WRITER)
    folder = tmp_path / "cache"
    cap_gb = 8 * (64 * 256 * 4 + ENTRY_OVERHEAD_BYTES) / 1e9  # room for half the keys: constant eviction
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    writers = [
        subprocess.Popen(
            [sys.executable, str(script), str(folder), str(who), "25", str(cap_gb)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for who in (0, 1)
    ]
    # Both start when both are ready: a writer that ran alone would thrash the LRU cap and never hit.
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{who}").exists() for who in (0, 1)):
        assert time.monotonic() < deadline and all(w.poll() is None for w in writers), "a writer did not start"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results = []
    for writer in writers:
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    for result in results:
        assert result["foreign"] == 0 and result["train/feature_cache/corrupt"] == 0
        assert result["train/feature_cache/enabled"] == 1.0
        assert result["train/feature_cache/hits"] > 0 and result["train/feature_cache/bytes_written"] > 0
    assert sum(r["train/feature_cache/evictions"] for r in results) > 0
    namespace = make_namespace("vision", "c" * 64, {"size": 32})
    reader = FeatureCache(folder, max_gb=1)
    for i in range(16):
        path = reader.path_of(namespace, f"image{i:02d}")
        if path.exists():  # whole, and one writer's value
            tensor, _ = decode_entry(path.read_bytes(), namespace, f"image{i:02d}")
            assert float(tensor[0, 0]) in (float(i), float(1000 + i))
    assert not list(folder.rglob("*.tmp"))
    assert reader.size_bytes() <= cap_gb * 1e9  # every put above 5% of the cap trims


# ------------------------------------------------------------------------------------ bad folders


def test_folder_that_cannot_be_created_turns_the_cache_off(tmp_path, caplog) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cache = FeatureCache(blocker / "feature_cache")
        encoder = CountingEncoder()
        inputs = torch.ones(2, 3)
        for _ in range(3):
            assert _bits(cache.get_or_encode(NS, ["a", "b"], inputs, encoder)) == _bits(CountingEncoder()(inputs))
        assert not cache.put(NS, "a", inputs[0])
    assert not cache.enabled and "a file stands where a folder is needed" in cache.disabled_reason
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "turned off" in warnings[0].getMessage()
    assert str(blocker) in warnings[0].getMessage()
    stats = cache.stats()
    assert stats["train/feature_cache/enabled"] == 0.0 and stats["train/feature_cache/misses"] == 6
    assert stats["train/feature_cache/hits"] == 0 and stats["train/feature_cache/bytes_written"] == 0


BAD_FOLDER_CHILD = textwrap.dedent("""
    import json, logging, sys
    import torch
    from theworld_core.features.cache import FeatureCache, make_namespace

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("theworld.feature_cache").addHandler(handler)
    namespace = make_namespace("vision", "d" * 64, {})
    cache = FeatureCache(sys.argv[1] + "/feature_cache", max_gb=1)
    written = sum(cache.put(namespace, f"k{i}", torch.zeros(64, 256)) for i in range(12))
    result = cache.get_or_encode(namespace, ["k0", "new"], torch.ones(2, 4), lambda x: x * 2)
    print(json.dumps({"written": written, "reason": cache.disabled_reason, "warnings": records,
                      "result_ok": bool(torch.equal(result, torch.ones(2, 4) * 2))}))
""")


def _in_private_tmpfs(tmp_path: Path, mount_options: str, then: str = "") -> dict:
    """Run BAD_FOLDER_CHILD with a small tmpfs at `tmp_path/mnt`, in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = tmp_path / "child.py"
    script.write_text(BAD_FOLDER_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    shell = f'mount -t tmpfs -o {mount_options} tmpfs "$1" && {then} exec "$2" "$3" "$1"'
    done = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            shell,
            "_",
            str(mount),
            sys.executable,
            str(script),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if done.returncode != 0 and ("mount" in done.stderr or "unshare" in done.stderr) and not done.stdout:
        pytest.skip(f"no private tmpfs mounts here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_full_disk_turns_the_cache_off(tmp_path) -> None:
    result = _in_private_tmpfs(tmp_path, "size=256k")  # room for a few 64 KiB entries
    assert 0 < result["written"] < 12
    assert "full" in result["reason"] and "ENOSPC" in result["reason"]
    assert len(result["warnings"]) == 1 and "turned off" in result["warnings"][0]
    assert result["result_ok"]  # lookups still answer, by encoding


def test_read_only_folder_turns_the_cache_off(tmp_path) -> None:
    result = _in_private_tmpfs(tmp_path, "size=1m", then='mount -o remount,ro "$1" &&')
    assert result["written"] == 0
    assert "not writable" in result["reason"] and "EROFS" in result["reason"]
    assert len(result["warnings"]) == 1 and result["result_ok"]


def test_entries_of_another_model_are_never_returned(tmp_path, caplog) -> None:
    cache = FeatureCache(tmp_path)
    theirs = make_namespace("vision", "1" * 64, {"size": 32})
    cache.put(theirs, "k", torch.full((4, 8), 7.0))
    ours = make_namespace("vision", "2" * 64, {"size": 32})
    # A folder whose files do not match their names (another cache scheme, copied folders).
    cache.path_of(ours, "k").parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(cache.path_of(theirs, "k"), cache.path_of(ours, "k"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = cache.get_or_encode(ours, ["k"], torch.zeros(1, 4, 8), lambda x: x + 1)
    assert torch.equal(result, torch.ones(1, 4, 8))
    assert not cache.enabled and "another base model" in cache.disabled_reason
    assert "another base model" in caplog.text

    shaped = FeatureCache(tmp_path / "shapes")
    shaped.put(ours, "k", torch.zeros(4, 8))
    assert shaped.get(ours, "k", shape=(4, 16)) is None  # another hidden size: another base
    assert not shaped.enabled and "(4, 8)" in shaped.disabled_reason


def test_off_and_bad_settings(tmp_path, monkeypatch, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        off = FeatureCache(tmp_path / "off", mode="off")
        assert _bits(off.get_or_encode(NS, ["a"], torch.ones(1, 2), lambda x: x * 3)) == _bits(torch.full((1, 2), 3.0))
    assert not off.enabled and not (tmp_path / "off").exists() and not caplog.records
    with pytest.raises(ValueError, match=r"feature_cache='on' is not allowed: use one of \['auto', 'off'\]"):
        FeatureCache(tmp_path, mode="on")
    for bad in (0, -1.0, "5", True):
        with pytest.raises(ValueError, match="feature_cache_max_gb="):
            FeatureCache(tmp_path, max_gb=bad)
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(tmp_path / "project"))
    assert FeatureCache().directory == (tmp_path / "project" / "feature_cache").resolve()


# ------------------------------------------------------------------------------------ stats and sizes


def test_stats_count_what_happened(tmp_path) -> None:
    cache = FeatureCache(tmp_path)
    inputs = torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5)
    cache.get_or_encode(NS, ["a", "b", "c"], inputs, CountingEncoder())
    files = [cache.path_of(NS, key) for key in "abc"]
    headers = [decode_entry(f.read_bytes(), NS, key)[1] for f, key in zip(files, "abc")]
    cache.get_or_encode(NS, ["a", "b", "d"], torch.cat([inputs[:2], inputs[:1]]), CountingEncoder())
    sizes = {key: cache.path_of(NS, key).stat().st_size for key in "abcd"}
    _flip_payload_byte(files[2])
    assert cache.get(NS, "c") is None
    stats = cache.stats()
    assert all(name.startswith("train/feature_cache/") and isinstance(value, float) for name, value in stats.items())
    assert stats["train/feature_cache/hits"] == 2 and stats["train/feature_cache/misses"] == 5
    assert stats["train/feature_cache/vision/hits"] == 2 and stats["train/feature_cache/vae_latent/hits"] == 0
    assert stats["train/feature_cache/hit_rate"] == pytest.approx(2 / 7)
    assert stats["train/feature_cache/corrupt"] == 1
    assert stats["train/feature_cache/bytes_written"] == sum(sizes.values())
    assert stats["train/feature_cache/bytes_read"] == sizes["a"] + sizes["b"]
    assert stats["train/feature_cache/encode_seconds"] > 0
    assert stats["train/feature_cache/encode_seconds_saved"] == pytest.approx(headers[0]["encode_seconds"] * 2)
    assert stats["train/feature_cache/evictions"] == 0


def test_bytes_per_sample_matches_the_entries(model, tiny_paths, tmp_path) -> None:
    config = model.config
    sizes = bytes_per_sample(config, dtype_bytes=4)
    hidden = model.gemma.config.get_text_config().hidden_size
    assert sizes["vision"] == model.gemma.config.mm_tokens_per_image * hidden * 4 + ENTRY_OVERHEAD_BYTES
    assert sizes["vae_latent"] == 16 * (32 // 8) ** 2 * 4 + ENTRY_OVERHEAD_BYTES
    assert sizes["total"] == sizes["vision"] + sizes["vae_latent"]
    cache = FeatureCache(tmp_path)
    encoders = CachedEncoders(model, cache)
    encoders.fill(_batch(model, [_image(0)]))  # fp32 on the CPU: 4 bytes per value
    for kind in ("vision", "vae_latent"):
        written = cache.path_of(encoders.namespaces[kind], image_key(_image(0))).stat().st_size
        assert sizes[kind] - ENTRY_OVERHEAD_BYTES < written <= sizes[kind]
    assert bytes_per_sample(config.model_copy(update={"enable_world": False}))["vae_latent"] == 0


def test_bytes_per_sample_of_the_real_architecture() -> None:
    gemma, cosmos = (
        SHARED / "reference" / "gemma-3-4b-it.config.json",
        SHARED / "reference" / "cosmos-predict2-vae.config.json",
    )
    if not (gemma.is_file() and cosmos.is_file()):
        pytest.skip(f"reference configs not found under {SHARED / 'reference'}")
    sizes = bytes_per_sample(ModelConfig(model_name=str(gemma), cosmos_model_name=str(cosmos)))  # bf16
    assert sizes["vision"] == 256 * 2560 * 2 + ENTRY_OVERHEAD_BYTES  # 1.25 MiB per image
    assert sizes["vae_latent"] == 16 * 32 * 32 * 2 + ENTRY_OVERHEAD_BYTES  # world_image_size 256


# ------------------------------------------------------------------------------------ in the workers


def test_workers_skip_preprocessing_for_cached_rows(model, tmp_path, monkeypatch) -> None:
    import pickle

    from theworld_core.training.batches import BatchCollator

    cache = FeatureCache(tmp_path)
    encoders = CachedEncoders(model, cache)
    worker = pickle.loads(pickle.dumps(BatchCollator(model.builder, encoders.lookup())))  # as a spawned worker gets it
    images = [_image(0), _image(1), _image(2)]
    rows = [{"image": image, "prompt": "What is shown?", "text": "shapes"} for image in images]
    direct = _batch(model, images)
    want_vision, want_world = (
        encoders.encode_vision(direct["pixel_values"]),
        encoders.encode_world(direct["world_pixel_values"]),
    )
    calls = Calls(monkeypatch)

    first = worker(rows)  # an empty cache: every row preprocessed, as without the cache
    assert calls.take() == (3, 3) and first["pixel_values"].shape[0] == 3 and first["feature_rows"]["vision"] == []
    filled = encoders.fill(first)
    encoders.flush()  # the entries are written in the background
    assert _bits(filled["image_features"]) == _bits(want_vision)
    assert _bits(filled["world_latents"]) == _bits(want_world)

    second = worker(rows)  # every row cached: no image processor, no VAE view
    assert calls.take() == (0, 0)
    assert "pixel_values" not in second and "world_pixel_values" not in second
    for key in ("input_ids", "labels", "attention_mask", "token_type_ids"):
        assert torch.equal(second[key], direct[key]), key  # the same token layout
    filled = encoders.fill(second)
    assert set(filled) == {"input_ids", "labels", "attention_mask", "token_type_ids", "image_features", "world_latents"}
    assert _bits(filled["image_features"]) == _bits(want_vision)
    assert _bits(filled["world_latents"]) == _bits(want_world)
    stats = cache.stats()  # the worker's counts reach the training process with the batch
    assert stats["train/feature_cache/hits"] == 6 and stats["train/feature_cache/misses"] == 6

    # A damaged entry is found when the worker reads it: that row alone is preprocessed, re-encoded, rewritten.
    damaged = cache.path_of(encoders.namespaces["vision"], image_key(images[1]))
    damaged.write_bytes(damaged.read_bytes()[:100])
    third = worker(rows)
    assert calls.take() == (1, 0)
    assert third["pixel_values"].shape[0] == 1 and third["feature_rows"]["vision"] == [0, 2]
    filled = encoders.fill(third)
    encoders.flush()
    assert _bits(filled["image_features"]) == _bits(want_vision)
    assert cache.stats()["train/feature_cache/corrupt"] == 1
    assert _bits(cache.get(encoders.namespaces["vision"], image_key(images[1]))) == _bits(want_vision[1])


def test_trainable_encoder_is_not_looked_up(tiny_paths, tmp_path, monkeypatch) -> None:
    config = ModelConfig(
        model_name=str(tiny_paths.gemma), cosmos_model_name=str(tiny_paths.cosmos), world_tokens=4, world_image_size=32
    )
    from theworld_core.training.batches import BatchCollator

    model = _stage(TheWorld.from_base(config).eval(), "stage2_vision")  # the vision tower trains
    cache = FeatureCache(tmp_path)
    encoders = CachedEncoders(model, cache)
    worker = BatchCollator(model.builder, encoders.lookup())
    rows = [{"image": _image(i), "prompt": "What is shown?", "text": "shapes"} for i in range(2)]
    encoders.fill(worker(rows))
    encoders.flush()
    calls = Calls(monkeypatch)
    batch = worker(rows)
    assert calls.take() == (2, 0) and batch["pixel_values"].shape[0] == 2
    filled = encoders.fill(batch)
    assert "image_features" not in filled and torch.equal(filled["pixel_values"], batch["pixel_values"])
    assert "world_latents" in filled and not list((tmp_path / "v1" / "vision").rglob("*.bin"))


def test_token_layout_without_pixels_is_the_processors(model) -> None:
    builder = model.builder
    image = _image(7, size=(64, 48))
    for prompt in ("What is shown?", "", "Two\nlines <b>and</b> <end_of_turn> tokens"):
        full = builder.encode(image, prompt, "an answer")
        lite = builder.encode(image, prompt, "an answer", vision=False, world=False)
        assert set(lite) == {"input_ids", "labels", "attention_mask", "token_type_ids"}
        for key in lite:
            assert torch.equal(lite[key], full[key]), (prompt, key)
        assert builder.prompt_length(prompt) == int((full["labels"] == -100).sum())
    panned = copy.deepcopy(builder.processor)
    panned.image_processor.do_pan_and_scan = True  # tokens then depend on the image: always preprocessed
    from theworld_core.model.inputs import InputBuilder

    other = InputBuilder(panned, builder.ids, builder.world_tokens, 32, True, builder.max_seq_length)
    assert not other.layout_without_pixels()
