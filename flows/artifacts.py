"""What the flow run shows in the Prefect UI (its artifacts): numbers rounded, MLflow runs linked.

A link is the run's page in the MLflow UI when the tracking URI is an http(s) server, else the run
id (a local SQLite store has no pages: `mlflow ui` on it serves them at a port of your choice).
"""

from __future__ import annotations

from typing import Any

from theworld_core.tracking import lineage

ROUNDING = {"eval_loss": 4, "task_accuracy": 4}
"""Decimals of the table's float columns (the summary markdown prints 4 as well)."""


class RunLinks:
    """MLflow run ids -> links (URLs on an http server, else the ids) within one experiment."""

    def __init__(self, experiment: str) -> None:
        import mlflow

        uri = mlflow.get_tracking_uri().rstrip("/")
        self.base = uri if uri.startswith(("http://", "https://")) else None
        self.experiment_id = None
        if self.base:
            found = lineage.client().get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else None

    def url(self, run_id: str | None) -> str | None:
        if not run_id or not self.base or not self.experiment_id:
            return None
        return f"{self.base}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def plain(self, run_id: str | None) -> str:
        """The URL, else the run id (table cells)."""
        return self.url(run_id) or (run_id or "")

    def markdown(self, run_id: str | None, text: str | None = None) -> str:
        """`[text](url)`, else `` `run_id` `` (with the text before it when given)."""
        if not run_id:
            return "-"
        url = self.url(run_id)
        if url:
            return f"[{text or run_id}]({url})"
        return f"{text} (`{run_id}`)" if text else f"`{run_id}`"


def rounded(value: Any, decimals: int) -> Any:
    return round(value, decimals) if isinstance(value, float) else value


def stage_table(rows: list[dict[str, Any]], links: RunLinks) -> list[dict[str, Any]]:
    """The `stage-summary` table: one row per stage attempt, floats rounded, its MLflow run linked."""
    table = []
    for row in rows:
        out = {k: rounded(v, ROUNDING[k]) if k in ROUNDING else v for k, v in row.items()}
        out["mlflow_run"] = links.plain(row.get("run_id"))
        table.append(out)
    return table


def comparison_markdown(
    summary_markdown: str,
    rows: list[dict[str, Any]],
    parent_run_id: str,
    links: RunLinks,
    registered_model: str,
    model_version: int | None,
    alias: str,
) -> str:
    """The `stage-comparison` markdown: the summary logged to MLflow, then where each run is."""
    lines = ["", "## MLflow", "", f"- pipeline (parent) run: {links.markdown(parent_run_id)}"]
    lines += [f"- {row['stage']} attempt {row['attempt']}: {links.markdown(row.get('run_id'))}" for row in rows]
    if model_version is not None:
        lines.append(f"- champion: `models:/{registered_model}/{model_version}` (alias `@{alias}`)")
    return summary_markdown.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def no_new_data_markdown(base_markdown: str, previous_run_id: str | None, links: RunLinks) -> str:
    """The `no-new-data` markdown with the earlier run linked."""
    if not previous_run_id:
        return base_markdown
    return base_markdown.rstrip("\n") + f"\n\nEarlier run in MLflow: {links.markdown(previous_run_id)}\n"
