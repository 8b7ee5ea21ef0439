"""Compare the MLflow runs of an experiment: parameters and final metrics side by side, validation curves plotted.

Run from ``bundle/``::

    python -m scripts.compare_runs --tracking_uri sqlite:///runs/train/mlflow.db --experiment promptnucseg \\
        [--stage segmentor] [--filter "params.lr = '0.0001'"] [--plot curves.png] [--all_params]

The table has one column per run (oldest first): run name, stage, dataset, variant and status, then the
parameters whose value differs between the runs that have them (all of them with ``--all_params`` or a single
run; ``-`` where a run has no such parameter or metric), then the last
value of every epoch-level metric (validation ``pq``, ``f1_det``, ..., loss terms, evaluation figures) and the
best validation value (``best_pq``, ``best_f1_det``). The plot has one panel per curve metric (default ``pq``
and ``f1_det``) with one line per run, epoch on the x axis; a curve metric that no run logged is named in a
warning that lists the metrics the runs have.

The store is only read: a ``sqlite`` URI whose database file does not exist, or an ``http(s)`` server that does
not answer, is an error naming it (MLflow would create an empty database, or retry for minutes).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

__all__ = ["check_store", "load_runs", "comparison_table", "plot_curves", "missing_curves", "main"]

DEFAULT_URI = "sqlite:///runs/train/mlflow.db"
DEFAULT_CURVES = ("pq", "f1_det")
ROW_TAGS = ("mlflow.runName", "stage", "dataset", "variant", "session")
SKIPPED_METRICS = re.compile(r"^(train_loss|lr_group_\d+)$")  # per-iteration traces: curves, not figures
FIRST_METRICS = ("pq", "best_pq", "f1_det", "best_f1_det", "mpq", "bpq", "aji", "aji_plus", "dq", "sq",
                 "precision_det", "recall_det", "best_epoch", "loss")


def check_store(tracking_uri: str, timeout: float = 5.0) -> None:
    """Refuse a store that cannot be read as it is: a ``sqlite:///<path>`` whose database file does not exist
    (MLflow would create an empty one), an ``http(s)`` server that does not answer within ``timeout`` seconds.

    Raises:
        ValueError: naming the database file or the server.
    """
    scheme = urlparse(tracking_uri).scheme
    if scheme == "sqlite":
        path = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else ""
        if path in ("", ":memory:"):
            raise ValueError(f"tracking_uri {tracking_uri} names no database file")
        if not Path(path).is_file():
            raise ValueError(f"no MLflow database {Path(path).resolve()} (tracking_uri {tracking_uri}); "
                             f"point --tracking_uri at the mlflow.db of a training, e.g. {DEFAULT_URI}")
    elif scheme in ("http", "https"):
        from scripts.training.tracking import tracking_problem

        problem = tracking_problem(tracking_uri, timeout)
        if problem:
            raise ValueError(f"tracking_uri: {problem}")


def load_runs(tracking_uri: str, experiment: str, stage: str | None = None, filter_string: str | None = None,
              max_runs: int = 50) -> pd.DataFrame:
    """The runs of ``experiment`` as a frame like ``mlflow.search_runs``'s (``run_id``, ``status``, ``params.*``,
    ``metrics.*`` (last values), ``tags.*``), oldest first, optionally of one ``stage`` tag.

    Raises:
        ValueError: the store does not exist or answer (:func:`check_store`); the experiment does not exist (the
            message lists the experiments of ``tracking_uri``).
    """
    import mlflow

    check_store(tracking_uri)

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment {experiment!r} at {tracking_uri}; experiments there: {names}")
    filters = [filter_string] if filter_string else []
    if stage:
        filters.append(f"tags.stage = '{stage}'")
    # the client, not the fluent mlflow.search_runs: that one would set MLFLOW_TRACKING_URI for the process
    found_runs = client.search_runs([found.experiment_id], filter_string=" and ".join(filters),
                                    order_by=["attributes.start_time ASC"], max_results=max_runs)
    rows = []
    for run in found_runs:
        row = {"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time}
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _run_label(row: pd.Series) -> str:
    name = row.get("tags.mlflow.runName")
    return str(name) if isinstance(name, str) and name else str(row["run_id"])[:8]


def _metric_order(name: str) -> tuple[int, str]:
    return (FIRST_METRICS.index(name) if name in FIRST_METRICS else len(FIRST_METRICS), name)


def comparison_table(runs: pd.DataFrame, all_params: bool = False) -> pd.DataFrame:
    """Rows: tags, parameters (those that differ unless ``all_params``), metrics; one column per run."""
    if runs.empty:
        return pd.DataFrame()
    rows: dict[str, list] = {"run_id": [str(r)[:8] for r in runs["run_id"]]}
    for tag in ROW_TAGS[1:]:
        column = f"tags.{tag}"
        if column in runs:
            rows[tag] = runs[column].tolist()
    rows["status"] = runs["status"].tolist()
    param_columns = sorted(c for c in runs.columns if c.startswith("params."))
    for column in param_columns:
        values = runs[column]
        distinct = values.dropna().astype(str).nunique()  # among the runs that have it
        if all_params or len(runs) == 1 or distinct > 1:
            rows[column] = values.tolist()
    metric_names = sorted((c[len("metrics."):] for c in runs.columns if c.startswith("metrics.")), key=_metric_order)
    for name in metric_names:
        if SKIPPED_METRICS.match(name) or runs[f"metrics.{name}"].isna().all():
            continue
        rows[f"metrics.{name}"] = runs[f"metrics.{name}"].round(4).tolist()
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[_run_label(r) for _, r in runs.iterrows()])
    return table.fillna("-")


def missing_curves(runs: pd.DataFrame, metrics: Sequence[str]) -> tuple[list[str], list[str]]:
    """The metrics of ``metrics`` that no run of ``runs`` logged, and (sorted) the metrics the runs have."""
    have = sorted(c[len("metrics."):] for c in runs.columns
                  if c.startswith("metrics.") and not runs[c].isna().all())
    return [m for m in metrics if m not in have], have


def plot_curves(tracking_uri: str, runs: pd.DataFrame, path: str | os.PathLike,
                metrics: Sequence[str] = DEFAULT_CURVES) -> Path:
    """PNG with one panel per metric in ``metrics`` and one line per run (value against epoch). Returns ``path``.

    A metric that no run logged (a typo, another stage's) keeps its empty panel and is named in a warning on
    stderr that lists the metrics the runs have.
    """
    missing, have = missing_curves(runs, metrics)
    if missing:
        print(f"warning: no run logged {', '.join(repr(m) for m in missing)}; their panels are empty. Metrics of "
              f"these runs: {', '.join(have) or 'none'}", file=sys.stderr)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        drawn = 0
        for _, run in runs.iterrows():
            history = sorted(client.get_metric_history(run["run_id"], metric), key=lambda m: (m.step, m.timestamp))
            if not history:
                continue
            ax.plot([m.step for m in history], [m.value for m in history], marker="o", label=_run_label(run))
            drawn += 1
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no run logged it", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m scripts.compare_runs", description=__doc__.split("\n")[0])
    parser.add_argument("--tracking_uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI),
                        help=f"MLflow tracking URI (default $MLFLOW_TRACKING_URI or {DEFAULT_URI})")
    parser.add_argument("--experiment", default="promptnucseg", help="experiment name (default promptnucseg)")
    parser.add_argument("--stage", default=None, help="only runs with this stage tag (prompter, segmentor, evaluation)")
    parser.add_argument("--filter", default=None, help="an MLflow search filter, e.g. \"params.lr = '0.0001'\"")
    parser.add_argument("--max_runs", type=int, default=50, help="at most this many runs (default 50)")
    parser.add_argument("--all_params", action="store_true", help="list every parameter, not only those that differ")
    parser.add_argument("--curves", default=",".join(DEFAULT_CURVES), help="metrics to plot, comma separated")
    parser.add_argument("--plot", default=None, help="PNG path of the curves (default compare_<experiment>.png)")
    args = parser.parse_args(argv)

    try:
        runs = load_runs(args.tracking_uri, args.experiment, args.stage, args.filter, args.max_runs)
    except ValueError as error:
        parser.error(str(error))
    if runs.empty:
        print(f"no runs in experiment {args.experiment!r} at {args.tracking_uri} matching the filters")
        return pd.DataFrame()
    table = comparison_table(runs, args.all_params)
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                           "display.max_colwidth", 40):
        print(f"{len(runs)} runs of experiment {args.experiment!r} at {args.tracking_uri}")
        print(table.to_string())
    curves = [m.strip() for m in args.curves.split(",") if m.strip()]
    plot = plot_curves(args.tracking_uri, runs, args.plot or f"compare_{args.experiment}.png", curves)
    print(f"curves of {', '.join(curves)}: {plot}")
    return table


if __name__ == "__main__":
    main()
