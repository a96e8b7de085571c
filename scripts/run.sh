#!/usr/bin/env bash
# Install (scripts/bootstrap.sh) and run the main job on the embedded default: tiny local models,
# synthetic data, Prefect's ephemeral API and MLflow in local SQLite under ./.theworld/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/theworld run --profile tiny "$@"
