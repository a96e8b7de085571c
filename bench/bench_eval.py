"""In-loop evaluation's share of a stage's time, and batched vs one-at-a-time generation (tiny models).

    .venv/bin/python bench/bench_eval.py                 # CPU: about 5 minutes on 2 cores
    .venv/bin/python bench/bench_eval.py --eval-samples 512 --gen-samples 64 --out bench/eval.json

1. Evaluation share. A tiny stage at `stages.yaml`'s recipe (stage 1 freeze flags, batch_size 4 x
   gradient_accumulation_steps 4, bf16 policy, which is fp32 on a CPU) trains `--steps` optimizer
   steps with evaluation and saves switched off: s/step. Then `StageTrainer.evaluate()` (what the
   loop calls every `eval_steps`) on `--eval-samples` held-out samples (stages.yaml's
   `eval_max_samples` default, 512), `--repeats` times: s/evaluation. The share at a cadence is
   eval / (eval_steps x step + eval), for stages.yaml's 5000 and the key's default 1000, and for
   the whole held-out split (no `eval_max_samples`) of a DataComp-sized stage for contrast.
2. Generation. `evaluate_model`'s task metric generates greedy answers for `--gen-samples` held-out
   samples (the pipeline's `eval_task_samples`, 64): one at a time (`generate`) against
   `generate_batch` at batch 4 (stages.yaml's batch_size) and 16, `--max-new-tokens` each; answers
   must agree.

The tiny models make the ratio, not the absolute times, the result: on Gemma 3 4B both a step and an
evaluation forward grow with the model, the step about 3x a forward (backward) x 16 micro-batches.
Prints a Markdown table and one JSON line (prefixed `JSON `).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

# isort: off
from bench_env import ROOT  # (first: transformers, datasets and MLflow read its environment at import)
# isort: on

import torch  # noqa: E402

from theworld_core.config import load_stage_config  # noqa: E402

SEED = ROOT / "configs" / "seed"


def stage_config(tiny, root: Path, args):
    return load_stage_config(SEED / "stage1_projection.json").with_changes(
        model_name=str(tiny.gemma),
        cosmos_model_name=str(tiny.cosmos),
        world_tokens=4,
        world_image_size=32,
        dataset_name="synthetic",
        synthetic_samples=int((args.eval_samples + 64) / 0.1) + 200,
        synthetic_image_size=32,
        eval_fraction=0.1,
        streaming=False,
        output_dir=str(root / "stage"),
        push_to_hub=False,
        resume_from_checkpoint=None,
        batch_size=4,
        gradient_accumulation_steps=4,
        max_steps=args.steps + 2,
        warmup_steps=1,
        do_eval=False,
        save_steps=10_000,
        logging_steps=1,
        eval_max_samples=args.eval_samples,
        mixed_precision="bf16",
    )


def measure_share(cfg, args) -> dict:
    from theworld_core.training.trainer import StageTrainer

    stamps: list[float] = []

    class Timed(StageTrainer):
        def _after_step(self, window, grad_norm):
            stamps.append(time.perf_counter())
            super()._after_step(window, grad_norm)

    trainer = Timed(cfg)
    result = trainer.run()
    assert result.status == "completed", result.reason
    steps = stamps[2:]  # the first two: allocations, the freeze audit
    step_s = (steps[-1] - steps[0]) / (len(steps) - 1)
    # The trainer's own evaluate(), as the loop calls it (rank 0, unwrapped model, its precision).
    evals = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        loss = trainer.evaluate()
        evals.append(time.perf_counter() - started)
    eval_s = statistics.median(evals)
    eval_rows = len(trainer._eval_rows())
    shares = {cadence: eval_s / (cadence * step_s + eval_s) for cadence in (5000, 1000)}
    # Contrast: no eval_max_samples on DataComp-1B (5% held out = ~70M samples), at cadence 5000.
    whole = 70_000_000 / eval_rows * eval_s
    return {
        "step_s": step_s,
        "eval_s": eval_s,
        "eval_rows": eval_rows,
        "eval_loss": loss,
        "share_at_5000": shares[5000],
        "share_at_1000": shares[1000],
        "share_whole_datacomp_eval_at_5000": whole / (5000 * step_s + whole),
    }


def measure_generation(cfg, args) -> dict:
    from theworld_core.model.inputs import prepare_stage_data
    from theworld_core.model.theworld import TheWorld

    model = TheWorld.from_base(cfg.model_part()).eval()
    rows = prepare_stage_data(cfg).eval.select(range(args.gen_samples))
    images, prompts = [r["image"] for r in rows], [r["prompt"] for r in rows]
    out: dict = {}
    started = time.perf_counter()
    alone = [model.generate(i, p, max_new_tokens=args.max_new_tokens) for i, p in zip(images, prompts)]
    out["one_at_a_time_s"] = time.perf_counter() - started
    for batch in (4, 16):
        started = time.perf_counter()
        answers = []
        for at in range(0, len(images), batch):
            answers += model.generate_batch(
                images[at : at + batch], prompts[at : at + batch], max_new_tokens=args.max_new_tokens
            )
        out[f"batch_{batch}_s"] = time.perf_counter() - started
        out[f"batch_{batch}_speedup"] = out["one_at_a_time_s"] / out[f"batch_{batch}_s"]
        out[f"batch_{batch}_same_answers"] = sum(a == b for a, b in zip(answers, alone)) / len(alone)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default %(default)s)")
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from theworld_core.model.tiny import ensure_tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["THEWORLD_PROJECT_DIR"] = str(root / "project")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        tiny = ensure_tiny_models(root / "tiny")
        cfg = stage_config(tiny, root, args)
        share = measure_share(cfg, args)
        generation = measure_generation(cfg, args)
    print("| measure | value |\n|---|---:|")
    print(f"| s / optimizer step (batch 4 x accumulation 4) | {share['step_s']:.3f} |")
    print(f"| s / in-loop evaluation ({share['eval_rows']} samples) | {share['eval_s']:.2f} |")
    print(f"| evaluation share, eval_steps 5000 | {100 * share['share_at_5000']:.2f} % |")
    print(f"| evaluation share, eval_steps 1000 | {100 * share['share_at_1000']:.2f} % |")
    print(
        f"| share without eval_max_samples (DataComp 5 % held out), eval_steps 5000 | "
        f"{100 * share['share_whole_datacomp_eval_at_5000']:.1f} % |"
    )
    print(f"| generation, {args.gen_samples} answers one at a time | {generation['one_at_a_time_s']:.2f} s |")
    for batch in (4, 16):
        print(
            f"| generation, batch {batch} | {generation[f'batch_{batch}_s']:.2f} s "
            f"({generation[f'batch_{batch}_speedup']:.2f}x; same answers "
            f"{100 * generation[f'batch_{batch}_same_answers']:.0f} %) |"
        )
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "share": share,
        "generation": generation,
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
    print("JSON " + json.dumps(record))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
