"""The data path and the feature cache: what they buy, as ratios measured in one run.

    .venv/bin/python bench/bench_data_path.py --part all --out bench/data_path.json

Parts (`--part`, default all):

- `tiny`: the tiny stage 1 (world projector trains; vision tower and VAE frozen) over `--epochs`
  epochs of synthetic data, `StageTrainer.run()` with `feature_cache: off`, then `auto` with an
  empty cache folder (epoch 1 fills it, the others read it), then `auto` again on that folder (every
  image cached), in `--rounds` interleaved rounds (other jobs' load falls on every arm alike).
  Reported: steps/s of the training loop (`time/train_s`; setup and the final save excluded), the
  ratios per round, their median and the ratio of all rounds' seconds (goal >= 1.4x), the load
  average after each run, and the cache's counters. Defaults: the tiny profile's data and batch
  (400 synthetic samples, batch 8: 3 epochs are 147 steps) and 8 rounds (one arm trains 2-5 s,
  so single rounds swing by +-20 % on a shared box). All arms use the same worker count
  (`--workers`, default the trainer's).
- `data`: the per-sample CPU work of the data path at the real preprocessing sizes: decode a JPEG
  (`--source-px`, default 640x480, as web images are), Gemma 3's image processor with the settings
  of gemma-3-4b-it (896 x 896, bilinear, rescale 1/255, mean = std = 0.5, no pan and scan), the
  chat template + tokenizer (tiny tokenizer: the same work per token), the 256 px VAE view, the
  cache key and lookup. Images/s through a DataLoader with `num_workers` 0 and the default, on
  cache misses (all of that) and on cache hits (entries of the real sizes read and checked instead
  of the processor and the VAE view), per core (`num_workers` 0); beside what a real-size stage 1
  needs on one H100 at 40 % MFU (from FLOPs, part `flops`).
- `flops`: stage-1 training FLOPs per sample of the reference architecture (meta device, counted
  with torch's FlopCounterMode through bench_gpu_stages.py), before (frozen encoders run every
  step, lm_head over the whole sequence) and after (features from the cache, lm_head over the
  answer tokens only), and the ratio; samples/s at 40 % MFU of an H100 (989 dense bf16 TFLOP/s).

Prints Markdown tables and one JSON line (prefixed `JSON `).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

# isort: off
from bench_env import ROOT  # (first: transformers, datasets and MLflow read its environment at import)
# isort: on

import torch  # noqa: E402  (after the environment it reads at import)

H100_PEAK_TFLOPS = 989.0  # dense bf16, SXM
MFU = 0.40


# ------------------------------------------------------------------------------------ tiny stage 1


def part_tiny(args) -> dict:
    """`--rounds` rounds of (off, auto from an empty folder, auto with every image cached), the arms
    interleaved so that load from other jobs falls on all of them alike; ratios per round and their median."""
    from theworld_core.config import load_stage_config
    from theworld_core.model.tiny import ensure_tiny_models
    from theworld_core.training.trainer import StageTrainer

    tiny = ensure_tiny_models()
    work = Path(tempfile.mkdtemp(prefix="bench-data-path-"))
    os.environ["THEWORLD_PROJECT_DIR"] = str(work / "project")
    rounds = []
    try:
        for index in range(args.rounds):
            runs = {}
            for arm, mode in (("off", "off"), ("auto", "auto"), ("warm", "auto")):  # warm: auto's folder, filled
                cfg = load_stage_config(ROOT / "configs" / "seed" / "stage1_projection.json").with_changes(
                    model_name=str(tiny.gemma),
                    cosmos_model_name=str(tiny.cosmos),
                    world_tokens=4,
                    world_image_size=32,
                    dataset_name="synthetic",
                    synthetic_samples=args.samples,
                    synthetic_image_size=32,
                    streaming=False,
                    output_dir=str(work / f"{arm}-{index}"),
                    push_to_hub=False,
                    resume_from_checkpoint=None,
                    batch_size=args.batch,
                    gradient_accumulation_steps=1,
                    max_steps=None,
                    num_epochs=args.epochs,
                    warmup_steps=2,
                    do_eval=False,
                    save_steps=100_000,
                    logging_steps=10,
                    num_workers=args.workers,
                    feature_cache=mode,
                    feature_cache_dir=str(work / f"features-{index}"),  # empty at each round's auto arm
                )
                torch.manual_seed(0)
                trainer = StageTrainer(cfg)
                result = trainer.run()
                train_s = trainer.timings["time/train_s"]
                runs[arm] = {
                    "steps": result.steps,
                    "train_s": train_s,
                    "steps_per_s": result.steps / train_s,
                    "epochs": result.steps / trainer.steps_per_epoch,
                    "num_workers": trainer.num_workers,
                    "load_average_1m": os.getloadavg()[0],
                    "cache": trainer.encoders.cache.stats() if mode == "auto" else None,
                }
            runs["ratio"] = runs["auto"]["steps_per_s"] / runs["off"]["steps_per_s"]
            runs["ratio_warm"] = runs["warm"]["steps_per_s"] / runs["off"]["steps_per_s"]
            rounds.append(runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = {arm: sum(r[arm]["train_s"] for r in rounds) for arm in ("off", "auto", "warm")}
    return {
        "rounds": rounds,
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "ratio_warm_median": statistics.median(r["ratio_warm"] for r in rounds),
        # every arm trains the same steps: the pooled ratio is total seconds uncached / cached
        "ratio_pooled": seconds["off"] / seconds["auto"],
        "ratio_warm_pooled": seconds["off"] / seconds["warm"],
    }


# ------------------------------------------------------------------------------------ data path


class _JpegRows(torch.utils.data.Dataset):
    """Rows as the trainer's collate gets them: a JPEG decoded to PIL RGB, a prompt, a caption."""

    def __init__(self, count: int, size: tuple[int, int]):
        from PIL import Image

        generator = torch.Generator().manual_seed(0)
        self.count = count
        self.jpegs = []
        for _ in range(8):
            pixels = (torch.rand(size[1] // 8, size[0] // 8, 3, generator=generator) * 255).to(torch.uint8)
            image = Image.fromarray(pixels.numpy()).resize(size)  # smooth: compresses like a photo
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            self.jpegs.append(buffer.getvalue())

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        from PIL import Image

        image = Image.open(io.BytesIO(self.jpegs[index % len(self.jpegs)])).convert("RGB")
        return {"image": image, "prompt": "Describe this image.", "text": f"a photo number {index} of a scene"}


def real_size_builder():
    """The tiny model's InputBuilder with gemma-3-4b-it's image processor settings and 256 px VAE images."""
    import importlib.util

    from transformers import AutoProcessor
    from transformers.models import gemma3

    # The torchvision backend where installed (as in the GPU images), else the PIL one (this box).
    Gemma3ImageProcessor = (
        gemma3.Gemma3ImageProcessor if importlib.util.find_spec("torchvision") else gemma3.Gemma3ImageProcessorPil
    )

    from theworld_core.model.inputs import InputBuilder, WorldTokenIds
    from theworld_core.model.tiny import ensure_tiny_models

    tiny = ensure_tiny_models()
    processor = AutoProcessor.from_pretrained(str(tiny.gemma))
    processor.image_processor = Gemma3ImageProcessor(
        size={"height": 896, "width": 896},
        resample=2,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        do_pan_and_scan=False,
    )
    tokenizer = processor.tokenizer
    tokenizer.add_tokens(["<start_of_world>", "<end_of_world>", "<world_soft_token>"], special_tokens=True)
    ids = WorldTokenIds(*tokenizer.convert_tokens_to_ids(["<start_of_world>", "<end_of_world>", "<world_soft_token>"]))
    return InputBuilder(processor, ids, world_tokens=64, world_image_size=256, enable_world=True, max_seq_length=4096)


REAL_ITEMS = {"vision": ((256, 2560), torch.bfloat16), "vae_latent": ((16, 1, 32, 32), torch.bfloat16)}
"""Entry shapes and dtypes of gemma-3-4b-it's vision features and the Cosmos latent at 256 px, bf16."""


def real_size_lookup(directory: Path, rows, fill: bool):
    """A `FeatureLookup` over `directory` with entries of the real sizes, for every image of `rows` if `fill`."""
    from theworld_core.features.cache import FeatureCache, make_namespace
    from theworld_core.features.encoders import FeatureLookup
    from theworld_core.features.keys import image_key

    cache = FeatureCache(directory)
    namespaces = {kind: make_namespace(kind, "b" * 64, {"bench": True}) for kind in REAL_ITEMS}
    if fill:
        for index in range(len(rows.jpegs)):
            key = image_key(rows[index]["image"])
            for kind, (shape, dtype) in REAL_ITEMS.items():
                cache.put(namespaces[kind], key, torch.randn(shape).to(dtype))
    return FeatureLookup(cache.reader(), namespaces, REAL_ITEMS)


def part_data(args) -> dict:
    from theworld_core.data.loading import default_num_workers, usable_cores
    from theworld_core.training.batches import BatchCollator

    builder = real_size_builder()
    size = tuple(int(side) for side in args.source_px.split("x"))
    rows = _JpegRows(args.images, size)
    default = default_num_workers(1)
    out = {
        "cores": usable_cores(),
        "default_workers": default,
        "source_px": args.source_px,
        "runs": {},
        "image_processor": type(builder.processor.image_processor).__name__,
    }
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        collates = {
            "miss": BatchCollator(builder, real_size_lookup(work / "empty", rows, fill=False)),
            "hit": BatchCollator(builder, real_size_lookup(work / "filled", rows, fill=True)),
        }
        sample = collates["miss"]([rows[0]])
        assert sample["pixel_values"].shape[-2:] == (896, 896) and sample["world_pixel_values"].shape[-2:] == (256, 256)
        assert "pixel_values" not in collates["hit"]([rows[0]])
        for _ in range(args.data_rounds):  # interleaved: load from other jobs falls on every arm
            for workers in sorted({0, default}):
                for case, collate in collates.items():
                    loader = torch.utils.data.DataLoader(
                        rows,
                        batch_size=args.batch,
                        collate_fn=collate,
                        num_workers=workers,
                        persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None,
                    )
                    iterator = iter(loader)
                    next(iterator)  # worker start-up and the first batch are not the steady state
                    started, images = time.perf_counter(), 0
                    for batch in iterator:
                        images += batch["input_ids"].shape[0]
                    elapsed = time.perf_counter() - started
                    out["runs"].setdefault(f"{case} workers={workers}", []).append(
                        {"images_per_s": images / elapsed, "load_average_1m": os.getloadavg()[0]}
                    )
                    del iterator, loader
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for runs in out["runs"].values():
        for run in runs:
            run["images_per_s"] = round(run["images_per_s"], 2)
    best = {name: max(run["images_per_s"] for run in runs) for name, runs in out["runs"].items()}
    out["best_images_per_s"] = best
    out["per_core_images_per_s"] = {case: best[f"{case} workers=0"] for case in collates}  # one core does it all
    out["hit_vs_miss_per_core"] = out["per_core_images_per_s"]["hit"] / out["per_core_images_per_s"]["miss"]
    return out


# ------------------------------------------------------------------------------------ FLOPs


def part_flops(args) -> dict:
    import bench_gpu_stages as gpu
    from torch.utils.flop_counter import FlopCounterMode

    reference = (
        Path(args.reference)
        if args.reference
        else next((p for p in (gpu.REFERENCE, Path("/work/shared/reference")) if p.is_dir()), gpu.REFERENCE)
    )
    parser_args = gpu.parse_args(
        [
            "--meta",
            "--gemma",
            str(reference / "gemma-3-4b-it.config.json"),
            "--cosmos",
            str(reference / "cosmos-predict2-vae.config.json"),
        ]
    )
    work = Path(tempfile.mkdtemp(prefix="bench-flops-"))
    try:
        sources = gpu.resolve_sources(parser_args, work)
        model = gpu.build_meta(sources)
        processor = str(gpu.tiny_processor_dir(parser_args))  # at the real image size and ids, as bench_gpu_stages
        inputs = gpu.BenchInputs(
            processor, model.gemma.config, model.token_ids, parser_args, sources.model_config.max_seq_length
        )
        layout = inputs.layout(parser_args)
        fwd = gpu.forward_flops(sources, layout)
        hidden = model.gemma.config.get_text_config().hidden_size
        counter = FlopCounterMode(display=False)
        with torch.device("meta"), counter, torch.no_grad():
            model.gemma.lm_head(torch.randn(1, layout.seq_len, hidden))
        lm_head_all = int(counter.get_total_flops())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lm_head_answer = lm_head_all * layout.labelled // layout.seq_len
    stage1 = ("world_projector",)
    before = gpu.training_flops_per_sample(fwd, stage1)
    cached = before - fwd["gemma_vision"] - fwd["cosmos_vae"]
    answer_only = dict(fwd, gemma_language=fwd["gemma_language"] - lm_head_all + lm_head_answer)
    after = gpu.training_flops_per_sample(answer_only, stage1) - fwd["gemma_vision"] - fwd["cosmos_vae"]
    need = {
        name: MFU * H100_PEAK_TFLOPS * 1e12 / flops
        for name, flops in (("before", before), ("cache", cached), ("cache_and_answer_loss", after))
    }
    return {
        "layout": {
            "seq_len": layout.seq_len,
            "answer_tokens": layout.labelled,
            "image_px": layout.image_size,
            "world_px": layout.world_image_size,
            "world_tokens": layout.world_tokens,
        },
        "forward_flops": fwd,
        "lm_head_flops_whole_sequence": lm_head_all,
        "train_flops_per_sample": {"before": before, "cache": cached, "cache_and_answer_loss": after},
        "speedup": {"cache": before / cached, "cache_and_answer_loss": before / after},
        "h100_40pct_mfu_samples_per_s": need,
    }


# ------------------------------------------------------------------------------------ report


def machine() -> dict:
    from theworld_core.data.loading import usable_cores

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    return {
        "cpu": cpu,
        "cores": usable_cores(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def report(result: dict) -> str:
    lines = [f"machine: {result['machine']}"]
    if "flops" in result:
        f = result["flops"]
        t, n = f["train_flops_per_sample"], f["h100_40pct_mfu_samples_per_s"]
        lines += [
            "",
            "| stage 1, reference architecture | training TFLOP / sample | speed-up | H100 samples/s at 40 % MFU |",
            "|---|---:|---:|---:|",
        ]
        for key, label in (
            ("before", "before (encoders every step, lm_head over the sequence)"),
            ("cache", "feature cache"),
            ("cache_and_answer_loss", "cache + loss on answer tokens only"),
        ):
            speed = 1.0 if key == "before" else f["speedup"][key]
            lines.append(f"| {label} | {t[key] / 1e12:.2f} | {speed:.2f}x | {n[key]:.1f} |")
    if "data" in result:
        d = result["data"]
        lines += ["", f"| data path ({d['cores']} cores), images/s | runs (load 1m) | best |", "|---|---|---:|"]
        for name, runs in d["runs"].items():
            listed = ", ".join(f"{run['images_per_s']:.1f} ({run['load_average_1m']:.1f})" for run in runs)
            lines.append(f"| {name} | {listed} | {d['best_images_per_s'][name]:.1f} |")
        lines.append(f"| hit / miss per core | | {d['hit_vs_miss_per_core']:.1f}x |")
    if "tiny" in result:
        tiny = result["tiny"]
        lines += [
            "",
            "| round | steps (epochs) | off steps/s | auto, empty folder | every image cached | ratio auto/off | warm/off | load 1m |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for index, run in enumerate(tiny["rounds"], start=1):
            loads = "/".join(f"{run[arm]['load_average_1m']:.1f}" for arm in ("off", "auto", "warm"))
            lines.append(
                f"| {index} | {run['off']['steps']} ({run['off']['epochs']:.1f}) | {run['off']['steps_per_s']:.2f} | "
                f"{run['auto']['steps_per_s']:.2f} | {run['warm']['steps_per_s']:.2f} | {run['ratio']:.2f}x | "
                f"{run['ratio_warm']:.2f}x | {loads} |"
            )
        lines.append(f"| median | | | | | {tiny['ratio_median']:.2f}x | {tiny['ratio_warm_median']:.2f}x | |")
        if "ratio_pooled" in tiny:
            lines.append(
                f"| all rounds (total seconds) | | | | | {tiny['ratio_pooled']:.2f}x | {tiny['ratio_warm_pooled']:.2f}x | |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "tiny", "data", "flops"), default="all")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=400, help="tiny: synthetic samples (the tiny profile's)")
    parser.add_argument("--batch", type=int, default=8, help="tiny: batch size (the tiny profile's)")
    parser.add_argument("--workers", type=int, help="tiny: num_workers for both arms (default: the trainer's)")
    parser.add_argument("--rounds", type=int, default=8, help="tiny: interleaved rounds of the three arms")
    parser.add_argument("--images", type=int, default=96, help="data: images through each loader")
    parser.add_argument("--source-px", default="640x480", help="data: size of the JPEGs decoded")
    parser.add_argument("--data-rounds", type=int, default=2, help="data: interleaved rounds of every arm")
    parser.add_argument("--reference", help="flops: folder of the reference configs (default: bench_gpu_stages')")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": machine()}
    for part, run in (("flops", part_flops), ("data", part_data), ("tiny", part_tiny)):
        if args.part in ("all", part):
            result[part] = run(args)
    print(report(result))
    print("JSON " + json.dumps(result, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
