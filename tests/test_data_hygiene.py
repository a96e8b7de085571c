"""Data hygiene: the split never puts a sample's content on both sides; a caption too long for the
model and an unreadable metadata line are counted bad samples, not the end of a stage."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset, IterableDataset, disable_progress_bars
from PIL import Image

from theworld_core.config import DataConfig
from theworld_core.data import PreparedData, TooManyBadSamples, prepare_data
from theworld_core.data.add import add_images, read_captions
from theworld_core.data.synthetic import shape_spec
from theworld_core.model.inputs import ModelSequenceLimit, SequenceTooLongError

disable_progress_bars()


def _prepare(cfg: DataConfig, tmp_path: Path, **kwargs) -> PreparedData:
    return prepare_data(cfg, cache_dir=tmp_path / "hf-cache", **kwargs)


def _contents(dataset: Dataset | IterableDataset) -> list[tuple[bytes, str]]:
    """(RGB pixels, caption) of every sample: what a model sees."""
    return [(sample["image"].tobytes(), sample["text"]) for sample in dataset]


def _ids(dataset: Dataset | IterableDataset) -> list[str]:
    return [sample["id"] for sample in dataset]


def _save(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- item 10: synthetic eval never shows a training sample -------------------------------------


@pytest.mark.parametrize(("samples", "streaming"), [(400, False), (400, True), (2000, False)])
def test_synthetic_eval_shares_no_content_with_train(tmp_path, samples, streaming):
    # The generator has 2,592 distinct samples, so these sets repeat many (on the id-based split,
    # 7 of 42 eval samples at 400 and 99 of 201 at 2,000 were copies of training samples).
    distinct = {shape_spec(0, index).content_key for index in range(samples)}
    assert len(distinct) < samples
    prepared = _prepare(DataConfig(synthetic_samples=samples, eval_fraction=0.1, streaming=streaming), tmp_path)
    train, held_out = _contents(prepared.train), _contents(prepared.eval)
    assert len(train) + len(held_out) == samples
    assert 0.05 * samples < len(held_out) < 0.15 * samples
    assert not set(train) & set(held_out)


def test_synthetic_split_stays_monotone_and_stable(tmp_path):
    small = _prepare(DataConfig(synthetic_samples=400, eval_fraction=0.1), tmp_path / "a")
    large = _prepare(DataConfig(synthetic_samples=800, eval_fraction=0.1), tmp_path / "b")
    wider = _prepare(DataConfig(synthetic_samples=400, eval_fraction=0.3), tmp_path / "c")
    assert set(_ids(small.eval)) <= set(_ids(large.eval))  # adding samples moves none
    assert set(_ids(small.eval)) <= set(_ids(wider.eval))  # a larger fraction only adds to eval
    assert set(_ids(wider.train)) <= set(_ids(small.train))


# --- item 11: local files split by resolved path and content ------------------------------------


def _folder_with_duplicates(root: Path, count: int) -> Path:
    """`count` distinct images, each listed three ways: its path, `sub/../<path>` and a byte copy
    under another name (with another caption)."""
    rows = []
    (root / "sub").mkdir(parents=True)
    for index in range(count):
        name = f"img{index:03d}.png"
        _save(root / name, (index, 90, 200))
        (root / "copies").mkdir(exist_ok=True)
        (root / "copies" / f"copy-of-{index:03d}.png").write_bytes((root / name).read_bytes())
        rows += [
            {"file_name": name, "text": f"caption {index}"},
            {"file_name": f"sub/../{name}", "text": f"caption {index}"},
            {"file_name": f"copies/copy-of-{index:03d}.png", "text": f"another caption {index}"},
        ]
    _write_jsonl(root / "metadata.jsonl", rows)
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_local_duplicates_land_on_one_side(tmp_path, streaming):
    root = _folder_with_duplicates(tmp_path / "data", 40)
    prepared = _prepare(DataConfig(dataset_name=str(root), eval_fraction=0.3, streaming=streaming), tmp_path)
    train, held_out = list(prepared.train), list(prepared.eval)
    assert len(train) + len(held_out) == 120 and prepared.stats.bad == 0
    train_pixels = {sample["image"].tobytes() for sample in train}
    assert held_out and not train_pixels & {sample["image"].tobytes() for sample in held_out}
    # One file written two ways is one sample path: the second spelling is its repeat.
    ids = set(_ids(train) + _ids(held_out))
    assert {"img015.png", "img015.png#2", "copies/copy-of-015.png"} <= ids
    assert not any("sub/" in sample_id for sample_id in ids)


# --- item 8: unreadable lines and too-long captions are counted --------------------------------


def _folder(root: Path, count: int) -> list[dict]:
    rows = []
    for index in range(count):
        _save(root / f"img{index:03d}.png", (index * 5 % 256, 40, 100))
        rows.append({"file_name": f"img{index:03d}.png", "text": f"a small square number {index}"})
    return rows


@pytest.mark.parametrize("streaming", [False, True])
def test_invalid_utf8_line_is_one_bad_record(tmp_path, streaming):
    root = tmp_path / "data"
    rows = _folder(root, 30)
    lines = [json.dumps(row).encode() + b"\n" for row in rows]
    lines[6] = b'{"file_name": "img006.png", "text": "caf\xe9 au lait"}\n'  # Latin-1, not UTF-8
    (root / "metadata.jsonl").write_bytes(b"".join(lines))
    prepared = _prepare(DataConfig(dataset_name=str(root), streaming=streaming), tmp_path)
    list(prepared.train)  # a stream counts its train part while it is read
    assert prepared.stats.bad_reasons == {"bad_record": 1}
    assert prepared.stats.train + prepared.stats.eval == 29
    assert prepared.stats.bad_examples == [("metadata.jsonl:7", "bad_record: invalid UTF-8 at column 41 (byte 0xe9)")]


def test_invalid_utf8_csv_row_is_one_bad_record(tmp_path):
    root = tmp_path / "data"
    rows = _folder(root, 25)
    body = "file_name,text\n" + "".join(f"{row['file_name']},{row['text']}\n" for row in rows)
    data = body.encode().replace(b"number 3\n", b"number \xff3\n")
    (root / "metadata.csv").write_bytes(data)
    prepared = _prepare(DataConfig(dataset_name=str(root)), tmp_path)
    assert prepared.stats.bad_reasons == {"bad_record": 1}
    assert prepared.stats.bad_examples[0][0] == "metadata.csv:5"
    assert "invalid UTF-8" in prepared.stats.bad_examples[0][1]


@pytest.fixture(scope="module")
def tiny_limit(tiny_paths) -> ModelSequenceLimit:
    """The tiny model with room for the template, image and world tokens plus 40 caption tokens."""
    probe = ModelSequenceLimit(str(tiny_paths.gemma), None, world_tokens=4, enable_world=True, max_seq_length=8)
    room = probe.builder().prompt_length("Describe this image.") + 40
    return ModelSequenceLimit(str(tiny_paths.gemma), None, world_tokens=4, enable_world=True, max_seq_length=room)


def test_measured_length_is_what_encode_builds(tiny_limit):
    builder = tiny_limit.builder()
    image = Image.new("RGB", (37, 21), (10, 200, 30))
    for prompt, answer in [("Describe this image.", "a red circle"), ("What?", "x " * 15), ("", "")]:
        measured = builder.prompt_length(prompt) + builder.answer_length(answer)
        assert measured == len(builder.encode(image, prompt, answer)["input_ids"])
    long_caption = "word " * 200
    assert tiny_limit.problem("Describe this image.", "fits") is None
    problem = tiny_limit.problem("Describe this image.", long_caption)
    assert f"over max_seq_length={tiny_limit.max_seq_length}" in problem and "1,000 characters" in problem
    with pytest.raises(SequenceTooLongError):  # what the collator would have raised at the batch
        builder.encode(image, "Describe this image.", long_caption)


@pytest.mark.parametrize("streaming", [False, True])
def test_too_long_caption_is_counted_and_the_rest_prepared(tmp_path, tiny_limit, streaming):
    root = tmp_path / "data"
    rows = _folder(root, 30)
    rows[11]["text"] = "x" * 50_000
    _write_jsonl(root / "metadata.jsonl", rows)
    cfg = DataConfig(dataset_name=str(root), streaming=streaming)
    prepared = _prepare(cfg, tmp_path, sequence_limit=tiny_limit)
    train = list(prepared.train)
    assert prepared.stats.bad_reasons == {"too_long": 1}
    assert len(train) + len(prepared.eval) == 29
    assert "img011.png" not in _ids(train) + _ids(prepared.eval)
    ((sample_id, why),) = prepared.stats.bad_examples
    assert sample_id == "img011.png" and why.startswith("too_long: metadata.jsonl:12: sequence of ")
    assert f"over max_seq_length={tiny_limit.max_seq_length}" in why and "50,000 characters" in why
    # Every usable sample fits: none would fail at its batch.
    builder = tiny_limit.builder()
    for sample in train + list(prepared.eval):
        builder.encode(sample["image"], sample["prompt"], sample["text"])
    # Which samples are usable depends on the limit, so the fingerprint does.
    unchecked = _prepare(cfg, tmp_path)
    assert unchecked.fingerprint != prepared.fingerprint
    assert unchecked.stats.bad == 0


def test_too_long_captions_count_under_max_bad_fraction(tmp_path, tiny_limit):
    root = tmp_path / "data"
    rows = _folder(root, 20)
    for row in rows[:4]:
        row["text"] = "long " * 400
    _write_jsonl(root / "metadata.jsonl", rows)
    with pytest.raises(TooManyBadSamples, match=r"4 of 20 samples .*too_long=4"):
        _prepare(DataConfig(dataset_name=str(root), max_bad_fraction=0.1), tmp_path, sequence_limit=tiny_limit)


# --- `theworld data add` ------------------------------------------------------------------------


def test_data_add_warns_about_or_refuses_a_too_long_caption(tmp_path, tiny_limit, caplog):
    image = _save(tmp_path / "in" / "long.png", (1, 2, 3))
    with caplog.at_level(logging.WARNING):
        added = add_images([str(image)], tmp_path / "folder", caption="x" * 50_000)
    assert added[0].warning is not None and str(image) in added[0].warning and "50,000 characters" in added[0].warning
    assert str(image) in caplog.text
    with pytest.raises(ValueError, match=r"long\.png: sequence of \d+ tokens .* over max_seq_length=") as info:
        add_images([str(image)], tmp_path / "other", caption="x" * 50_000, sequence_limit=tiny_limit)
    assert str(image) in str(info.value)
    assert not (tmp_path / "other" / "metadata.jsonl").exists()  # refused before anything is written
    assert (
        add_images([str(image)], tmp_path / "other", caption="a dark square", sequence_limit=tiny_limit)[0].warning
        is None
    )


def test_data_add_to_a_folder_with_an_invalid_line(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "old.png", "text": "caf\xe9"}\n')
    image = _save(tmp_path / "in" / "new.png", (9, 9, 9))
    add_images([str(image)], folder, caption="a grey square")
    lines = (folder / "metadata.jsonl").read_bytes().splitlines()
    assert lines[0] == b'{"file_name": "old.png", "text": "caf\xe9"}' and json.loads(lines[1])["file_name"] == "new.png"
    captions = tmp_path / "captions.jsonl"
    captions.write_bytes(b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"captions\.jsonl:2: invalid UTF-8"):
        read_captions(captions)
