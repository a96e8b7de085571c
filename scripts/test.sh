#!/usr/bin/env bash
# Install (scripts/bootstrap.sh), lint (ruff) and run the whole test suite offline.
# Arguments go to pytest, e.g. `bash scripts/test.sh -m "not e2e"` for the quick loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
# Lint and format first (a second or two): CI enforces them with the tests.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
