"""The data package: sources, split, bad-sample accounting, fingerprints, streaming parity."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, IterableDataset, disable_progress_bars
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from theworld_core.config import DataConfig
from theworld_core.data import (
    DEFAULT_PROMPT,
    SOURCES,
    DataStats,
    PreparedData,
    TooManyBadSamples,
    content_group,
    prepare_data,
    split_score,
)
from theworld_core.data.synthetic import COLOURS, POSITIONS, SHAPES, cell_box, shape_spec

disable_progress_bars()

_SYNTHETIC_CAPTION = re.compile(
    r"^an? (?P<colour>\w+) (?P<shape>\w+) at the (?P<position>[\w ]+) on an? (?P<background>\w+) background$"
)


# --- helpers ------------------------------------------------------------------------------------


def _prepare(cfg: DataConfig, tmp_path: Path, **kwargs) -> PreparedData:
    """prepare_data with a cache private to the test."""
    return prepare_data(cfg, cache_dir=tmp_path / "hf-cache", **kwargs)


def _rows(dataset: Dataset | IterableDataset) -> list[tuple[str, str, str, bytes]]:
    """(id, prompt, text, RGB pixel bytes) of every sample, in order."""
    rows = []
    for sample in dataset:
        image = sample["image"]
        assert image.mode == "RGB"
        rows.append((sample["id"], sample["prompt"], sample["text"], image.tobytes()))
    return rows


def _ids(dataset: Dataset | IterableDataset) -> list[str]:
    if isinstance(dataset, Dataset):
        return list(dataset["id"])
    return [sample["id"] for sample in dataset]


def _save(path: Path, colour=(200, 10, 10), mode: str = "RGB", size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _folder(root: Path, count: int, *, prefix: str = "img") -> Path:
    """An imagefolder with `count` distinct red-ish images and captions."""
    rows = []
    for index in range(count):
        name = f"images/{prefix}{index:03d}.png"
        _save(root / name, colour=(index % 256, 40, 200))
        rows.append({"file_name": name, "text": f"caption {index}"})
    _write_jsonl(root / "metadata.jsonl", rows)
    return root


def _local(path: Path, **overrides) -> DataConfig:
    return DataConfig(dataset_name=str(path), **overrides)


def _synthetic_score(sample_id: str) -> float:
    """Split score of a synthetic sample: its group is what is drawn, not its id."""
    seed, index = sample_id.removeprefix("synthetic-").split("-")
    return split_score(shape_spec(int(seed), int(index)).content_key)


# --- synthetic ----------------------------------------------------------------------------------


def test_synthetic_is_deterministic_by_seed(tmp_path):
    cfg = DataConfig(synthetic_samples=40, seed=3)
    first = _prepare(cfg, tmp_path / "a")
    again = _prepare(cfg, tmp_path / "b")  # separate cache: really generated twice
    other = _prepare(cfg.model_copy(update={"seed": 4}), tmp_path / "c")

    assert _rows(first.train) == _rows(again.train)
    assert _rows(first.eval) == _rows(again.eval)
    assert first.fingerprint == again.fingerprint
    assert [row[3] for row in _rows(first.train)] != [row[3] for row in _rows(other.train)]
    assert first.fingerprint != other.fingerprint
    assert all(sample_id.startswith("synthetic-4-") for sample_id in _ids(other.train))
    assert first.stats.total == 40 and first.stats.bad == 0
    assert first.stats.train + first.stats.eval == 40


def test_synthetic_captions_describe_the_pixels(tmp_path):
    size = 48
    prepared = _prepare(DataConfig(synthetic_samples=30, synthetic_image_size=size), tmp_path)
    samples = list(prepared.train) + list(prepared.eval)
    assert len(samples) == 30
    for sample in samples:
        match = _SYNTHETIC_CAPTION.match(sample["text"])
        assert match, sample["text"]
        assert match["shape"] in SHAPES
        row, column = next((r, c) for r in range(3) for c in range(3) if POSITIONS[r][c] == match["position"])
        left, top, right, bottom = cell_box(row, column, size)
        image = sample["image"]
        assert image.size == (size, size)
        # The centre of the named cell has the shape's colour, the centre of the opposite cell and
        # every corner of the image the background's.
        assert image.getpixel(((left + right) // 2, (top + bottom) // 2)) == COLOURS[match["colour"]]
        far_left, far_top, far_right, far_bottom = cell_box(2 - row, 2 - column, size)
        if (row, column) != (1, 1):
            assert (
                image.getpixel(((far_left + far_right) // 2, (far_top + far_bottom) // 2))
                == COLOURS[match["background"]]
            )
        assert image.getpixel((0, 0)) == COLOURS[match["background"]] or (row, column) == (0, 0)
        assert sample["prompt"] == DEFAULT_PROMPT


def test_synthetic_covers_every_choice():
    specs = [shape_spec(0, index) for index in range(2000)]
    assert {spec.shape for spec in specs} == set(SHAPES)
    assert {spec.colour for spec in specs} == set(COLOURS)
    assert {(spec.row, spec.column) for spec in specs} == {(r, c) for r in range(3) for c in range(3)}
    assert all(spec.colour != spec.background for spec in specs)


def test_synthetic_default_size_is_fast(tmp_path):
    started = time.perf_counter()
    prepared = _prepare(DataConfig(), tmp_path)  # 2000 images of 64 px
    elapsed = time.perf_counter() - started
    assert prepared.stats.total == 2000
    assert elapsed < 10, f"2000 synthetic samples took {elapsed:.1f}s"


# --- split --------------------------------------------------------------------------------------


def test_split_is_disjoint_and_stable_when_samples_are_added(tmp_path):
    small = _prepare(DataConfig(synthetic_samples=300, eval_fraction=0.1), tmp_path / "s")
    large = _prepare(DataConfig(synthetic_samples=600, eval_fraction=0.1), tmp_path / "l")
    for prepared, count in ((small, 300), (large, 600)):
        train, held_out = set(_ids(prepared.train)), set(_ids(prepared.eval))
        assert not train & held_out
        assert len(train | held_out) == count
        assert all(_synthetic_score(sample_id) < 0.1 for sample_id in held_out)
    assert set(_ids(small.eval)) <= set(_ids(large.eval))
    assert set(_ids(small.train)) <= set(_ids(large.train))
    assert 10 <= len(small.eval) <= 55  # about 10% of 300


def test_split_does_not_depend_on_order(tmp_path):
    root = _folder(tmp_path / "data", 60)
    forward = _prepare(_local(root, eval_fraction=0.2), tmp_path / "a")
    lines = (root / "metadata.jsonl").read_text().splitlines(keepends=True)
    (root / "metadata.jsonl").write_text("".join(reversed(lines)))
    backward = _prepare(_local(root, eval_fraction=0.2), tmp_path / "b")
    assert set(_ids(forward.eval)) == set(_ids(backward.eval))
    assert forward.fingerprint == backward.fingerprint  # order is not content


def test_at_least_one_eval_sample(tmp_path):
    root = _folder(tmp_path / "data", 3)
    for streaming in (False, True):
        prepared = _prepare(_local(root, eval_fraction=0.001, streaming=streaming), tmp_path)
        assert len(prepared.eval) == 1
        train_ids = _ids(prepared.train)
        assert len(train_ids) == 2 and not set(train_ids) & set(_ids(prepared.eval))
        # The held-out one is the sample with the lowest split score: deterministic.
        lowest = min(
            (f"images/img{i:03d}.png" for i in range(3)),
            key=lambda name: split_score(content_group((root / name).read_bytes())),
        )
        assert _ids(prepared.eval) == [lowest]


def test_captions_of_one_image_share_a_split(tmp_path):
    _save(tmp_path / "a.png")
    rows = [{"image": "a.png", "text": f"caption {k}"} for k in range(3)]
    rows += [{"image": f"b{k}.png", "text": "other"} for k in range(30)]
    for k in range(30):
        _save(tmp_path / f"b{k}.png", colour=(k, k, k))
    table = _write_jsonl(tmp_path / "captions.jsonl", rows)
    prepared = _prepare(_local(table, eval_fraction=0.3), tmp_path)
    train, held_out = _ids(prepared.train), _ids(prepared.eval)
    a_ids = {"a.png", "a.png#2", "a.png#3"}
    assert a_ids <= set(train) or a_ids <= set(held_out)
    assert len(set(train) | set(held_out)) == 33  # ids stay unique


def test_num_samples_takes_the_first_n(tmp_path):
    prepared = _prepare(DataConfig(synthetic_samples=100, num_samples=25), tmp_path)
    assert prepared.stats.total == 25
    assert sorted(_ids(prepared.train) + _ids(prepared.eval), key=lambda i: int(i.split("-")[-1])) == [
        f"synthetic-0-{index}" for index in range(25)
    ]
    root = _folder(tmp_path / "data", 12)
    local = _prepare(_local(root, num_samples=5), tmp_path / "local")
    assert sorted(_ids(local.train) + _ids(local.eval)) == [f"images/img{index:03d}.png" for index in range(5)]
    all_of_it = _prepare(_local(root), tmp_path / "all")
    assert local.fingerprint != all_of_it.fingerprint


# --- local sources ------------------------------------------------------------------------------


def test_imagefolder_source(tmp_path):
    root = _folder(tmp_path / "data", 10)
    prepared = _prepare(_local(root, eval_fraction=0.3), tmp_path)
    samples = {sample["id"]: sample for sample in list(prepared.train) + list(prepared.eval)}
    assert set(samples) == {f"images/img{index:03d}.png" for index in range(10)}
    sample = samples["images/img007.png"]
    assert sample["text"] == "caption 7"
    assert sample["prompt"] == DEFAULT_PROMPT
    assert sample["image"].getpixel((0, 0)) == (7, 40, 200)
    assert prepared.stats.bad == 0 and prepared.stats.total == 10


def test_jsonl_source_with_ids_and_prompts(tmp_path):
    _save(tmp_path / "pics" / "x.png", colour=(1, 2, 3))
    _save(tmp_path / "pics" / "y.png", colour=(4, 5, 6))
    table = _write_jsonl(
        tmp_path / "list.jsonl",
        [
            {"path": "pics/x.png", "caption": "an x", "prompt": "What is it?", "uid": 17},
            {"image": "./pics/y.png", "text": "a y"},
        ],
    )
    prepared = _prepare(_local(table), tmp_path, default_prompt="Say it.")
    samples = {sample["id"]: sample for sample in list(prepared.train) + list(prepared.eval)}
    assert samples["17"]["text"] == "an x" and samples["17"]["prompt"] == "What is it?"
    assert samples["pics/y.png"]["prompt"] == "Say it."
    assert samples["pics/y.png"]["image"].getpixel((1, 1)) == (4, 5, 6)


def test_csv_source(tmp_path):
    for name in ("a", "b", "c"):
        _save(tmp_path / "img" / f"{name}.jpg", colour=(250, 250, 250))
    with (tmp_path / "data.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        writer.writerows([["img/a.jpg", "first, with a comma"], ["img/b.jpg", "second"], ["img/c.jpg", "third"]])
    prepared = _prepare(_local(tmp_path / "data.csv"), tmp_path)
    texts = {sample["id"]: sample["text"] for sample in list(prepared.train) + list(prepared.eval)}
    assert texts == {"img/a.jpg": "first, with a comma", "img/b.jpg": "second", "img/c.jpg": "third"}


def test_csv_without_caption_column_is_refused(tmp_path):
    (tmp_path / "data.csv").write_text("file_name,label\na.png,1\n")
    with pytest.raises(ValueError, match=r"text.*caption"):
        _prepare(_local(tmp_path / "data.csv"), tmp_path)


def test_other_image_modes_become_rgb(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    _save(root / "gray.png", colour=(90, 90, 90), mode="L")
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: composited on white
    rgba.save(root / "rgba.png")
    _save(root / "palette.gif", colour=(0, 0, 255), mode="P")
    Image.fromarray(np.full((5, 3), 65535, dtype=np.uint16)).save(root / "deep.png")  # 16-bit grayscale
    Image.new("CMYK", (6, 6), (0, 0, 0, 0)).save(root / "cmyk.jpg")
    Image.new("1", (3, 3), 1).save(root / "bits.bmp")
    big = Image.new("RGB", (1500, 40), (10, 20, 30))
    big.save(root / "wide.jpg")
    names = ["gray.png", "rgba.png", "palette.gif", "deep.png", "cmyk.jpg", "bits.bmp", "wide.jpg"]
    assert Image.open(root / "deep.png").mode.startswith("I")
    _write_jsonl(root / "metadata.jsonl", [{"file_name": name, "text": name} for name in names])

    prepared = _prepare(_local(root, max_bad_fraction=0.0), tmp_path)
    images = {sample["id"]: sample["image"] for sample in list(prepared.train) + list(prepared.eval)}
    assert set(images) == set(names) and prepared.stats.bad == 0
    assert all(image.mode == "RGB" for image in images.values())
    assert images["gray.png"].getpixel((0, 0)) == (90, 90, 90)
    assert images["rgba.png"].getpixel((0, 0)) == (255, 255, 255)
    assert images["rgba.png"].getpixel((1, 1)) == (255, 0, 0)
    assert images["palette.gif"].getpixel((0, 0)) == (0, 0, 255)
    assert images["deep.png"].getpixel((0, 0)) == (255, 255, 255) and images["deep.png"].size == (3, 5)
    assert images["bits.bmp"].getpixel((0, 0)) == (255, 255, 255)
    assert images["wide.jpg"].size == (1500, 40)
    assert max(abs(a - b) for a, b in zip(images["cmyk.jpg"].getpixel((2, 2)), (255, 255, 255))) <= 3


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    image.save(tmp_path / "turned.jpg", exif=exif, quality=100)
    _write_jsonl(tmp_path / "m.jsonl", [{"image": "turned.jpg", "text": "t"}])
    prepared = _prepare(_local(tmp_path / "m.jsonl"), tmp_path)
    (sample,) = list(prepared.eval) + list(prepared.train)
    assert sample["image"].size == (2, 4)


# --- bad samples --------------------------------------------------------------------------------


def _folder_with_bad_files(root: Path, good: int) -> Path:
    """`good` usable images plus one missing, one truncated, one HTML page and one bad JSON line."""
    _folder(root, good)
    _save(root / "images" / "whole.png", size=(64, 64))
    data = (root / "images" / "whole.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "images" / "page.jpg").write_text("<!DOCTYPE html><html><body>Access denied</body></html>")
    (root / "images" / "whole.png").unlink()
    with (root / "metadata.jsonl").open("a") as handle:
        handle.write(json.dumps({"file_name": "images/gone.png", "text": "missing"}) + "\n")
        handle.write(json.dumps({"file_name": "images/truncated.png", "text": "truncated"}) + "\n")
        handle.write(json.dumps({"file_name": "images/page.jpg", "text": "html"}) + "\n")
        handle.write("{not json\n")
        handle.write(json.dumps({"file_name": "images/img000.png"}) + "\n")  # no caption
    return root


def test_bad_files_are_skipped_and_counted(tmp_path):
    root = _folder_with_bad_files(tmp_path / "data", 20)
    for streaming in (False, True):
        prepared = _prepare(_local(root, max_bad_fraction=0.5, streaming=streaming), tmp_path)
        samples = _ids(prepared.train) + _ids(prepared.eval)
        assert len(samples) == 20
        assert prepared.stats.complete is True
        assert prepared.stats.total == 25 and prepared.stats.bad == 5
        assert prepared.stats.bad_reasons == {
            "missing_file": 1,
            "corrupt_image": 1,
            "not_an_image": 1,
            "bad_record": 1,
            "missing_text": 1,
        }
        assert prepared.stats.train + prepared.stats.eval == 20


def test_too_many_bad_samples_names_the_numbers(tmp_path):
    root = _folder_with_bad_files(tmp_path / "data", 20)  # 5 bad of 25 = 20%
    with pytest.raises(TooManyBadSamples) as caught:
        _prepare(_local(root, max_bad_fraction=0.1), tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "5 of 25" in message and "20.0%" in message and "max_bad_fraction=0.1" in message
    assert "images/gone.png (missing_file" in message and "not_an_image" in message
    assert caught.value.bad == 5 and caught.value.seen == 25 and caught.value.limit == 0.1


def test_streaming_fails_while_iterating_when_bad_share_becomes_certain(tmp_path):
    root = _folder(tmp_path / "data", 10)
    for index in range(10):  # corrupt files are only found by decoding, i.e. while iterating
        path = root / "images" / f"junk{index}.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with (root / "metadata.jsonl").open("a") as handle:
        for index in range(10):
            handle.write(json.dumps({"file_name": f"images/junk{index}.png", "text": "junk"}) + "\n")
    prepared = _prepare(_local(root, streaming=True, max_bad_fraction=0.2, eval_fraction=0.01), tmp_path)
    with pytest.raises(TooManyBadSamples, match=r"of \d+ samples read so far .* above max_bad_fraction=0.2"):
        for _ in prepared.train:
            pass
    assert prepared.stats.bad > 0.2 * prepared.stats.total
    assert prepared.stats.bad_reasons.keys() <= {"corrupt_image", "not_an_image"}


def test_streaming_fails_at_preparation_when_files_are_missing(tmp_path):
    root = _folder(tmp_path / "data", 10)
    for path in list((root / "images").iterdir())[:5]:
        path.unlink()
    with pytest.raises(TooManyBadSamples, match=r"5 of 10 samples \(50.0%\)"):
        _prepare(_local(root, streaming=True, max_bad_fraction=0.1), tmp_path)


def test_bad_counts_survive_a_cache_hit(tmp_path):
    root = _folder_with_bad_files(tmp_path / "data", 20)
    first = _prepare(_local(root, max_bad_fraction=0.5), tmp_path)
    second = _prepare(_local(root, max_bad_fraction=0.5), tmp_path)  # same cache dir
    assert second.stats == first.stats and second.fingerprint == first.fingerprint


def test_no_usable_samples(tmp_path):
    _write_jsonl(tmp_path / "m.jsonl", [{"image": "gone.png", "text": "x"}])
    with pytest.raises(ValueError, match="none of its 1 samples is usable"):
        _prepare(_local(tmp_path / "m.jsonl", max_bad_fraction=1.0), tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no samples"):
        _prepare(_local(tmp_path / "empty.jsonl"), tmp_path)


# --- fingerprint --------------------------------------------------------------------------------


def test_fingerprint_tracks_content_not_files(tmp_path):
    root = _folder(tmp_path / "data", 8)
    base = _prepare(_local(root), tmp_path / "c0").fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", base)

    assert _prepare(_local(root), tmp_path / "c1").fingerprint == base
    os.utime(root / "images" / "img003.png", (1_000_000, 1_000_000))
    assert _prepare(_local(root), tmp_path / "c2").fingerprint == base
    copy = shutil.copytree(root, tmp_path / "copy")
    assert _prepare(_local(copy), tmp_path / "c3").fingerprint == base
    assert _prepare(_local(root, streaming=True), tmp_path / "c4").fingerprint == base

    _save(copy / "images" / "img003.png", colour=(3, 41, 200))  # one pixel value changed
    pixels = _prepare(_local(copy), tmp_path / "c5").fingerprint
    (copy / "metadata.jsonl").write_text((copy / "metadata.jsonl").read_text().replace("caption 5", "caption five"))
    caption = _prepare(_local(copy), tmp_path / "c6").fingerprint
    _save(copy / "images" / "new.png")
    with (copy / "metadata.jsonl").open("a") as handle:
        handle.write(json.dumps({"file_name": "images/new.png", "text": "new"}) + "\n")
    added = _prepare(_local(copy), tmp_path / "c7").fingerprint
    limited = _prepare(_local(copy, num_samples=100), tmp_path / "c8").fingerprint
    assert len({base, pixels, caption, added, limited}) == 5


def test_fingerprint_notices_a_missing_file_appearing(tmp_path):
    root = _folder(tmp_path / "data", 8)
    (root / "images" / "img002.png").rename(tmp_path / "aside.png")
    before = _prepare(_local(root, max_bad_fraction=0.5), tmp_path / "a")
    assert before.stats.bad_reasons == {"missing_file": 1}
    (tmp_path / "aside.png").rename(root / "images" / "img002.png")
    after = _prepare(_local(root, max_bad_fraction=0.5), tmp_path / "a")  # same cache: must not be stale
    assert after.fingerprint != before.fingerprint and after.stats.bad == 0


def test_files_edited_during_preparation_are_not_cached_under_the_old_key(tmp_path, monkeypatch):
    from theworld_core.data import prepare

    root = _folder(tmp_path / "data", 5)
    monkeypatch.setattr(prepare, "_hash_content", lambda *args: "0:" + "0" * 64)  # as if files changed since
    with pytest.raises(Exception) as caught:
        _prepare(_local(root), tmp_path)
    chain = [caught.value, caught.value.__cause__, caught.value.__context__]
    assert any("changed while it was being prepared" in str(error) for error in chain)


def test_synthetic_fingerprint_follows_its_parameters(tmp_path):
    base = DataConfig(synthetic_samples=20)
    prints = {
        _prepare(cfg, tmp_path).fingerprint
        for cfg in (
            base,
            base.model_copy(update={"seed": 1}),
            base.model_copy(update={"synthetic_samples": 21}),
            base.model_copy(update={"synthetic_image_size": 32}),
            base.model_copy(update={"num_samples": 10}),
        )
    }
    assert len(prints) == 5
    assert _prepare(base, tmp_path / "again").fingerprint == _prepare(base, tmp_path).fingerprint
    unaffected = base.model_copy(update={"max_bad_fraction": 0.3})
    assert _prepare(unaffected, tmp_path).fingerprint == _prepare(base, tmp_path).fingerprint


# --- streaming ----------------------------------------------------------------------------------


def test_streaming_yields_the_same_samples(tmp_path):
    synthetic = DataConfig(synthetic_samples=60, eval_fraction=0.2)
    local = _local(_folder_with_bad_files(tmp_path / "data", 20), max_bad_fraction=0.5, eval_fraction=0.2)
    for cfg in (synthetic, local):
        materialised = _prepare(cfg, tmp_path)
        streamed = _prepare(cfg.model_copy(update={"streaming": True}), tmp_path)
        assert isinstance(streamed.train, IterableDataset) and isinstance(streamed.eval, Dataset)
        assert streamed.stats.complete is False and streamed.stats.train == 0
        assert _rows(streamed.train) == _rows(materialised.train)
        assert _rows(streamed.eval) == _rows(materialised.eval)
        assert streamed.fingerprint == materialised.fingerprint
        assert _comparable(streamed.stats) == _comparable(materialised.stats)  # complete after one pass
        assert _rows(streamed.train) == _rows(materialised.train)  # a second epoch
        assert _comparable(streamed.stats) == _comparable(materialised.stats)


def _comparable(stats: DataStats) -> DataStats:
    """Streaming lists eval examples first; the examples themselves are the same."""
    return dataclasses.replace(stats, bad_examples=sorted(stats.bad_examples))


def test_streaming_counts_grow_while_reading(tmp_path):
    prepared = _prepare(DataConfig(synthetic_samples=100, streaming=True), tmp_path)
    iterator = iter(prepared.train)
    for _ in range(10):
        next(iterator)
    assert prepared.stats.train >= 10 and not prepared.stats.complete


# --- sources ------------------------------------------------------------------------------------


def test_unknown_dataset_name_says_what_is_allowed(tmp_path):
    with pytest.raises(ValueError) as caught:
        prepare_data(DataConfig(dataset_name="imagenet-please"))
    message = str(caught.value)
    assert "'imagenet-please'" in message and "'synthetic'" in message
    assert "metadata.jsonl" in message and ".csv" in message
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"suffix '.txt'"):
        prepare_data(DataConfig(dataset_name=str(tmp_path / "notes.txt")))
    with pytest.raises(ValueError, match="without metadata.jsonl"):
        prepare_data(DataConfig(dataset_name=str(tmp_path)))


def test_sources_registry_is_the_extension_point(tmp_path, monkeypatch):
    def tiny_source(cfg):
        return SOURCES["synthetic"](cfg.model_copy(update={"synthetic_samples": 12}))

    monkeypatch.setitem(SOURCES, "tiny:", tiny_source)
    prepared = _prepare(DataConfig(dataset_name="tiny:anything"), tmp_path)
    assert prepared.stats.total == 12


@settings(max_examples=200, deadline=None)
@given(group=st.text())
def test_split_score_is_a_stable_position_in_the_unit_interval(group):
    assert 0.0 <= split_score(group) < 1.0 and split_score(group) == split_score(str(group))


def test_split_score_is_uniform():
    scores = np.array([split_score(f"images/{index}.jpg") for index in range(20_000)])
    for fraction in (0.01, 0.05, 0.3):
        assert abs((scores < fraction).mean() - fraction) < 0.01


def test_accepts_a_stage_config(tmp_path):
    from theworld_core.config import StageConfig

    prepared = _prepare(StageConfig(synthetic_samples=20, seed=5), tmp_path)
    assert prepared.stats.total == 20
    assert prepared.fingerprint == _prepare(DataConfig(synthetic_samples=20, seed=5), tmp_path).fingerprint
