"""What every bench script sets up before it imports torch, transformers, datasets or MLflow:
offline and quiet (no hub, no telemetry, no progress bars), and the repository on `sys.path`.

Import it first (`from bench_env import ROOT`): those libraries read the environment when imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
