"""Peak training memory per stage on the tiny models: memory follows what is trained, not the model's size.

    .venv/bin/python bench/bench_memory.py     # the seed's four freeze settings, one fresh process each

For each of the seed's four stages, a fresh Python process builds TheWorld on the tiny bases
(`TheWorld.from_base`, `set_trainable` from the stage's freeze flags, `build_optimizer`: AdamW over
trainable parameters only), then runs a few optimizer steps (batch 8, the trainer's order: forward,
backward, clip, step) on pre-collated synthetic batches, and reports:

- peak memory of the steps above what the process held before the first step: on CUDA
  `torch.cuda.max_memory_allocated()`, else the process's peak RSS (`VmHWM` in /proc/self/status,
  reset to the current RSS just before the first step through /proc/self/clear_refs);
- bytes autograd saved for backward during one forward pass (saved-tensor hooks; parameters
  excluded): the activation memory that training keeps;
- gradient bytes after a backward pass and optimizer-state bytes after a step, and whether both
  belong to trainable parameters only;
- whether the frozen Cosmos VAE encoder and the frozen SigLIP vision tower ran without autograd
  (forward hooks: grad mode inside the call and `requires_grad` of their outputs).

Gemma's language model, even when frozen (stages 1 and 2), sits between the trainable world
projector and the loss, so autograd must keep its activations to reach the projector; only the
components *ahead of* every trainable one (the VAE, the vision tower when frozen) can run without it.

Prints a Markdown table and one JSON line (prefixed `JSON `).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# isort: off
import bench_env  # noqa: F401  (first: transformers, datasets and MLflow read its environment at import)
# isort: on

STAGES = ("stage1_projection", "stage2_vision", "stage3_language", "stage4_full")


# ------------------------------------------------------------------------------------ process memory


def _status_kib(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS tracks live memory more closely."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------ one stage (child)


def measure_stage(stage: str, args) -> dict:
    import torch
    from accelerate.utils import set_seed

    from theworld_core.config import StageConfig
    from theworld_core.data import prepare_data
    from theworld_core.model.components import SEED_STAGES, parameter_report, trainable_components
    from theworld_core.model.theworld import TheWorld
    from theworld_core.model.tiny import ensure_tiny_models
    from theworld_core.training.optim import build_optimizer

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny = ensure_tiny_models(Path(args.tiny_dir) if args.tiny_dir else None)
    cfg = StageConfig(
        model_name=str(tiny.gemma),
        cosmos_model_name=str(tiny.cosmos),
        world_tokens=args.world_tokens,
        world_image_size=args.world_image_size,
        synthetic_samples=max(40, args.batch_size * 3),
        batch_size=args.batch_size,
        **SEED_STAGES[stage],
    )
    set_seed(cfg.seed)
    data = prepare_data(cfg.data_part())
    model = TheWorld.from_base(cfg.model_part())
    trains = model.set_trainable(trainable_components(cfg.freeze_flags))
    model.to(device).train()
    optimizer, _ = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, cfg.component_learning_rates)
    builder = model.builder
    rows = [data.train[i] for i in range(args.batch_size)]
    batch = builder.collate([builder.encode(r["image"], r["prompt"], r["text"]) for r in rows])
    batch = {k: v.to(device) for k, v in batch.items()}
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]

    # Did the frozen branches run without autograd?
    seen: dict[str, dict] = {}

    def hook(name):
        def record(module, inputs, output):
            tensor = (
                output
                if torch.is_tensor(output)
                else next(
                    (v for v in (output.values() if hasattr(output, "values") else output) if torch.is_tensor(v)), None
                )
            )
            seen[name] = {
                "grad_mode": torch.is_grad_enabled(),
                "output_requires_grad": bool(tensor is not None and tensor.requires_grad),
            }

        return record

    handles = [
        model.vae.register_forward_hook(hook("cosmos_vae")),
        model.gemma.model.vision_tower.register_forward_hook(hook("gemma_vision_tower")),
    ]

    # What autograd keeps for backward during one forward (unique storages, parameters excluded).
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            return tensor
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    import gc

    # One forward without autograd first: lazy kernel and allocator set-up, not what training keeps.
    with torch.no_grad():
        model(**batch)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _trim_heap()
        reset = _reset_peak_rss()
        base = (_status_kib("VmRSS") or 0) * 1024
        hwm_before = (_status_kib("VmHWM") or 0) * 1024
    start = time.perf_counter()
    grad_bytes = grads_only_trainable = None
    for step in range(args.steps):
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                _, loss = model(**batch)
        else:
            _, loss = model(**batch)
        loss.backward()
        if step == args.steps - 1:
            with_grad = {n for n, p in named.items() if p.grad is not None}
            grad_bytes = sum(p.grad.nbytes for p in named.values() if p.grad is not None)
            grads_only_trainable = with_grad <= trainable
            grads_all_trainable = with_grad == trainable
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        if step < args.steps - 1:
            optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        peak_method = "cuda max_memory_allocated"
    else:
        peak = (_status_kib("VmHWM") or 0) * 1024 - base
        peak_method = "VmHWM - VmRSS before the steps" + ("" if reset else f" (HWM not reset; HWM before {hwm_before})")
    elapsed = time.perf_counter() - start
    for h in handles:
        h.remove()

    id_to_name = {id(p): n for n, p in named.items()}
    state_names = {id_to_name[id(p)] for p in optimizer.state}
    state_bytes = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    report = parameter_report(model)
    bytes_per = {n: p.element_size() for n, p in named.items()}
    return {
        "stage": stage,
        "trains": list(trains),
        "device": str(device),
        "params_total": sum(c.total for c in report.values()),
        "params_trainable": sum(c.trainable for c in report.values()),
        "param_bytes_total": sum(p.nbytes for p in named.values()),
        "param_bytes_trainable": sum(named[n].numel() * bytes_per[n] for n in trainable),
        "grad_bytes": grad_bytes,
        "grads_only_trainable": grads_only_trainable,
        "grads_all_trainable": grads_all_trainable,
        "trainable_without_grad": sorted(trainable - with_grad),
        "optimizer_state_bytes": state_bytes,
        "optimizer_state_only_trainable": state_names <= trainable,
        "optimizer_state_all_trainable": state_names == trainable,
        "saved_for_backward_bytes": sum(saved.values()),
        "peak_bytes": peak,
        "peak_method": peak_method,
        "base_bytes": base,
        "branches": seen,
        "steps": args.steps,
        "steps_s": round(elapsed, 2),
    }


# ------------------------------------------------------------------------------------ driver (parent)


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated (default: all four)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps measured per stage")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--world-tokens", type=int, default=16)
    parser.add_argument("--world-image-size", type=int, default=64)
    parser.add_argument("--tiny-dir", help="tiny model folder (default: $THEWORLD_HOME/tiny)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1")

    if args.child:
        print("RESULT " + json.dumps(measure_stage(args.child, args)), flush=True)
        return 0

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; allowed: {list(STAGES)}")
    from theworld_core.model.tiny import ensure_tiny_models

    ensure_tiny_models(Path(args.tiny_dir) if args.tiny_dir else None)  # built once, before the children
    passthrough = [
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--world-tokens",
        str(args.world_tokens),
        "--world-image-size",
        str(args.world_image_size),
    ]
    if args.tiny_dir:
        passthrough += ["--tiny-dir", args.tiny_dir]
    started = time.perf_counter()
    rows = []
    for stage in stages:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", stage, *passthrough], capture_output=True, text=True, check=False
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"{stage}: child process failed (exit {proc.returncode})")
        rows.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(f"# {stage}: peak {_mib(rows[-1]['peak_bytes'])} MiB", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started

    yes = lambda b: "yes" if b else "NO"  # noqa: E731
    print(
        f"\nbatch {args.batch_size}, world tokens {args.world_tokens}, world image {args.world_image_size} px, "
        f"{args.steps} optimizer steps, one fresh process per stage, device {rows[0]['device']} "
        f"({elapsed:.0f} s in all); sizes in MiB\n"
    )
    print(
        "| stage | trains | params trainable / total | trainable param MiB | grad MiB | AdamW state MiB "
        "| grads & state only trainable | saved for backward MiB | peak MiB | VAE without autograd "
        "| vision tower without autograd |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---|---|")
    for r in rows:

        def branch(key: str, component: str, r=r) -> str:
            seen = r["branches"].get(key)
            if not seen:
                return "not run"
            without = not seen["grad_mode"] and not seen["output_requires_grad"]
            if component in r["trains"]:
                return "no (trained)" if not without else "yes (TRAINED: wrong)"
            return "yes" if without else "NO (frozen: wrong)"

        print(
            f"| {r['stage']} | {', '.join(r['trains'])} | {r['params_trainable']:,} / {r['params_total']:,} "
            f"| {_mib(r['param_bytes_trainable'])} | {_mib(r['grad_bytes'])} | {_mib(r['optimizer_state_bytes'])} "
            f"| {yes(r['grads_only_trainable'] and r['optimizer_state_only_trainable'])} "
            f"| {_mib(r['saved_for_backward_bytes'])} | {_mib(r['peak_bytes'])} "
            f"| {branch('cosmos_vae', 'cosmos_vae')} | {branch('gemma_vision_tower', 'gemma_vision')} |"
        )
    unused = [
        f"{r['stage']}: {len(r['trainable_without_grad'])} trainable tensors got no gradient (unused by a "
        f"one-frame forward: {', '.join(r['trainable_without_grad'][:4])}{', ...' if len(r['trainable_without_grad']) > 4 else ''})"
        for r in rows
        if r["trainable_without_grad"]
    ]
    if unused:
        print("\n" + "; ".join(unused) + "; AdamW keeps no state for them.")
    print(
        f"\npeak: {rows[0]['peak_method']}, after one no-grad forward and a heap trim. AdamW state = exp_avg + exp_avg_sq (+ a scalar step) per trainable "
        "parameter, i.e. about 2x the trainable parameter bytes; gradients = 1x.\n"
    )
    print(
        "JSON "
        + json.dumps(
            {
                "bench": "memory",
                "batch_size": args.batch_size,
                "world_tokens": args.world_tokens,
                "world_image_size": args.world_image_size,
                "elapsed_s": round(elapsed, 1),
                "stages": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
