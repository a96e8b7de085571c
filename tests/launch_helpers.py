"""Launching `theworld train` in several processes from tests, and the parity settings that
tests/test_distributed.py (DDP) and tests/test_fsdp.py (FSDP) share: the equal-length image folder,
the stage configs, the tolerances (test_distributed.py's docstring says why they can be tight), the
`Job` that watches a launch's process tree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from theworld_core.config import load_stage_config

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "configs" / "seed"
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
THEWORLD_CLI = Path(sys.executable).parent / "theworld"
LAUNCH_TIMEOUT = 240  # seconds for any one launch: nothing may hang CI

B = 2  # per-rank batch; the 1-process run uses 2B
STEPS = 20
SETTINGS = {
    # stage 3 of the seed: world projector + vision + language unfrozen (gradient checkpointing on)
    "language": "stage3_language.json",
    # stage 1 of the seed: the world projector alone
    "projector": "stage1_projection.json",
}
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4


def write_equal_length_folder(tiny_paths, folder: Path) -> Path:
    """An image folder of synthetic shapes whose captions all tokenize to the same number of
    answer tokens (the most common length), so per-rank and global token means coincide."""
    from collections import Counter

    from transformers import AutoTokenizer

    from theworld_core.data.synthetic import render_png, shape_spec
    from theworld_core.model.inputs import END_OF_TURN

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_paths.gemma))
    specs = [shape_spec(0, i) for i in range(400)]
    lengths = [len(tokenizer(s.caption + END_OF_TURN, add_special_tokens=False)["input_ids"]) for s in specs]
    modal = Counter(lengths).most_common(1)[0][0]
    chosen = [s for s, n in zip(specs, lengths) if n == modal][:120]
    assert len(chosen) == 120
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, spec in enumerate(chosen):
        name = f"{i:04d}.png"
        (folder / name).write_bytes(render_png(spec, 32))
        rows.append(json.dumps({"file_name": name, "text": spec.caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def stage_config(tiny, seed_file: str, output_dir: Path, data: Path, **changes):
    """A seed stage file with the tiny models, the equal-length folder, a 20-step schedule that
    logs every step and saves/evaluates every 10, lr 1e-3; `changes` override any of it."""
    values = dict(
        model_name=str(tiny.gemma),
        cosmos_model_name=str(tiny.cosmos),
        world_tokens=4,
        world_image_size=32,
        dataset_name=str(data),
        streaming=False,
        output_dir=str(output_dir),
        push_to_hub=False,
        resume_from_checkpoint=None,
        learning_rate=1e-3,
        batch_size=B,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        warmup_steps=2,
        logging_steps=1,
        eval_steps=10,
        save_steps=10,
    )
    return load_stage_config(SEED / seed_file).with_changes(**{**values, **changes})


def write_config(cfg, path: Path) -> Path:
    path.write_text(json.dumps(cfg.model_dump(mode="json", exclude_unset=True), indent=2))
    return path


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


def loss_history(project: Path, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))


# ---------------------------------------------------------------------------------------------
# launching `theworld train` in its own process group, watching its ranks
# ---------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _rank_env(pid: int) -> dict[str, str] | None:
    """RANK/WORLD_SIZE/LOCAL_RANK of a rank process (None for the CLI and the launcher)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"theworld_core.cli" not in cmdline or b"torch.distributed.run" in cmdline:
        return None
    env = dict(item.decode(errors="replace").split("=", 1) for item in environ if b"=" in item)
    return {k: env.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} if "RANK" in env else None


class Job:
    """`theworld train --config CONFIG --json ARGS` started in a new session (its own process
    group), output to files (a full pipe can never stall it). It follows the job's process tree:
    the CLI, the launcher (torchrun / accelerate launch) and the ranks, which torchrun starts in
    sessions of their own, so they are not in the CLI's process group."""

    def __init__(self, config: Path, *args: str, project: Path, logs: Path, extra_env: dict | None = None):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "THEWORLD_PROJECT_DIR": str(project), **(extra_env or {})}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        self.cmd = [str(THEWORLD_CLI), "train", "--config", str(config), "--json", *args]
        self.start = time.monotonic()
        with open(self.out, "w") as stdout, open(self.err, "w") as stderr:
            self.proc = subprocess.Popen(self.cmd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        self.tree: dict[int, int] = {self.proc.pid: _stat(self.proc.pid)[2]}  # pid -> start time
        self.ranks: dict[int, dict] = {}  # pid -> RANK / WORLD_SIZE / LOCAL_RANK

    def scan(self) -> None:
        """Add the job's new descendants (and the ranks among them)."""
        children: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (stat := _stat(int(entry))) is not None:
                children[stat[0]].append((int(entry), stat[2]))
        todo = list(self.tree)
        while todo:
            for pid, started in children.get(todo.pop(), []):
                if pid not in self.tree:
                    self.tree[pid] = started
                    todo.append(pid)
        for pid in self.tree:
            if pid not in self.ranks and (info := _rank_env(pid)) is not None and not self._in_a_rank(pid):
                self.ranks[pid] = info

    def _in_a_rank(self, pid: int) -> bool:
        """A rank's DataLoader worker: it inherits the rank's environment but is no rank."""
        stat = _stat(pid)
        return stat is not None and stat[0] in self.tree and _rank_env(stat[0]) is not None

    def alive(self, pids=None) -> list[int]:
        """Processes of the job still running (zombies count as gone)."""
        alive = []
        for pid in self.tree if pids is None else pids:
            stat = _stat(pid)
            if stat is not None and stat[2] == self.tree[pid] and stat[1] != "Z":
                alive.append(pid)
        return alive

    def kill_launcher_group(self) -> None:
        """SIGKILL the CLI's process group: what `kill -9 -PGID` (or a runner killing the group) does."""
        os.killpg(self.proc.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        """SIGKILL every process of the job: the ranks' own groups first, then the CLI's group."""
        self.scan()
        for pid in self.alive():
            if pid != self.proc.pid:
                try:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                except OSError:
                    pass
        try:
            self.kill_launcher_group()
        except OSError:
            pass

    def wait(self, stop_when=None, kill=None) -> Launch:
        """Until the CLI exits (or, with `stop_when`, until it returns true, then `kill()`), scanning
        the process tree twice a second. Past LAUNCH_TIMEOUT the job is killed and the test fails.
        Every process of the job must be gone afterwards."""
        try:
            next_scan = 0.0
            while self.proc.poll() is None:
                now = time.monotonic()
                if now - self.start > LAUNCH_TIMEOUT:
                    pytest.fail(
                        f"`{' '.join(self.cmd)}` still running after {LAUNCH_TIMEOUT} s:\n"
                        f"{self.err.read_text()[-4000:]}"
                    )
                if stop_when is not None and stop_when():
                    kill()
                    self.proc.wait(timeout=60)
                    break
                if now >= next_scan:
                    self.scan()
                    next_scan = now + 0.5
                time.sleep(0.02)
            seconds = time.monotonic() - self.start
            deadline = time.monotonic() + 30
            while (left := self.alive()) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not left, f"processes of the job outlived it: {left}"
        finally:
            if self.proc.poll() is None or self.alive():
                self.kill_all()
                self.proc.wait(timeout=60)
        return Launch(
            self.proc.returncode, self.out.read_text(), self.err.read_text(), seconds, dict(self.ranks), len(self.tree)
        )


@dataclass
class Launch:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    ranks: dict[int, dict] = field(default_factory=dict)
    """pid -> RANK/WORLD_SIZE/LOCAL_RANK of every rank process seen while it ran."""
    processes: int = 0
    """processes of the job seen (CLI, launcher, ranks, ...)."""

    def result(self) -> dict:
        assert self.stdout.strip(), f"no JSON on stdout (exit {self.returncode}):\n{self.stderr[-4000:]}"
        return json.loads(self.stdout)

    def rank_ids(self) -> list[str]:
        # Distinct ranks: a rank's short-lived fork (e.g. MLflow running `git` while it starts a run)
        # carries the rank's command line and RANK until it execs, and may be seen in between.
        return sorted({r["RANK"] for r in self.ranks.values()})


EXIT_ABORT = "terminate called without an active exception"


def aborted_at_exit(run: Launch) -> bool:
    """A rank died of SIGABRT in interpreter teardown (its gloo process group never destroyed);
    torchrun then SIGTERMs the other rank, often before rank 0 wrote the stage result."""
    return run.returncode != 0 and not run.stdout.strip() and EXIT_ABORT in run.stderr


def launch(
    config: Path, *args: str, project: Path, logs: Path, extra_env: dict | None = None, before_retry=None
) -> Launch:
    """Run `theworld train` to its end (at most LAUNCH_TIMEOUT). `before_retry` is accepted for the
    callers' sake but unused: ranks now tear down their process group, so a launch is never retried."""
    return Job(config, *args, project=project, logs=logs, extra_env=extra_env).wait()


def assert_two_ranks(run: Launch) -> None:
    """Two rank processes really ran: RANK 0 and 1, WORLD_SIZE 2, distinct PIDs."""
    assert run.rank_ids() == ["0", "1"], (run.ranks, run.stderr[-2000:])
    assert {r["WORLD_SIZE"] for r in run.ranks.values()} == {"2"}, run.ranks
