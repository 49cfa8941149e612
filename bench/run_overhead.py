"""The whole run: how much of a ``topr run``'s wall time is model compute, and how much is
everything else (process start, imports, model loads and saves, serialisation, tracking).

Reads a finished run from its MLflow store; nothing is re-run. The parent run's wall time
(start to end, as the pipeline's first and exit tasks record them) is split as:

- sampling compute: each ``iter<i>/sample`` run's ``seconds`` metric (tokenising the prompts,
  ``generate`` with the behaviour log-probs, decoding), model load excluded;
- training compute: each ``iter<i>/train`` run's training loop, ``tokens`` divided by the last
  step's ``tokens_per_second`` (which the loop measures from its start); saving the model is
  the rest of its ``seconds`` metric and counts as serialisation;
- evaluation compute: the evaluate stage records no timing of its own, so its whole nested run
  (model load, greedy generation, verification, writing) counts as compute: an upper bound,
  which makes the overhead share a lower bound. ``estimated`` instead subtracts from each
  evaluate run the median in-run overhead of the sample runs (the same model load and similar
  tracking calls).

Everything else is overhead: stages without a model (prompts, verify, curate, collect), the
conversion of the starting model (prepare_model), the parts of the model stages outside compute,
and the gaps between stage runs (a process per pipeline task, imports, kfp.local's executor).
Target: overhead at most 10% of the run (issue 13; it was 15% before).

    .venv/bin/python bench/run_overhead.py                                     # runs/mlflow.db, latest run
    .venv/bin/python bench/run_overhead.py --tracking-uri sqlite:////tmp/def3/mlflow.db
    .venv/bin/python bench/run_overhead.py --tracking-uri http://127.0.0.1:5000 --run-id <parent run id>
"""

from __future__ import annotations

import statistics
import sys

import common

TARGET = 0.10


def parent_run(client, run_id: str | None, experiment: str):
    if run_id:
        return client.get_run(run_id)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment {experiment!r} in this tracking store")
    runs = client.search_runs(
        [found.experiment_id], filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=200
    )
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    if not parents:
        raise SystemExit(f"no finished parent run in experiment {experiment!r}")
    return parents[0]


def stage_rows(client, parent) -> list[dict]:
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=1000
    )
    rows = []
    for run in sorted(children, key=lambda r: r.info.start_time):
        metrics = run.data.metrics
        stage = run.data.tags.get("topr.stage", run.info.run_name.split("/")[-1])
        wall = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
        row = {"run": run.info.run_name, "stage": stage, "start": run.info.start_time / 1000, "end": (run.info.end_time or run.info.start_time) / 1000, "wall": wall, "compute": 0.0, "kind": ""}
        if stage == "sample" and "seconds" in metrics:
            row.update(compute=metrics["seconds"], kind="generate")
        elif stage == "train" and "tokens" in metrics:
            history = client.get_metric_history(run.info.run_id, "tokens_per_second")
            last = max(history, key=lambda m: m.step).value if history else metrics["tokens_per_second"]
            loop = metrics["tokens"] / last
            row.update(compute=min(loop, wall), kind="training loop", save=metrics.get("seconds", loop) - loop)
        elif stage == "evaluate":
            row.update(compute=wall, kind="whole stage run (upper bound)", upper_bound=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--tracking-uri", default="sqlite:///runs/mlflow.db", help="MLflow tracking URI (default sqlite:///runs/mlflow.db, where `make run` writes)")
    p.add_argument("--run-id", default=None, help="the parent run of one `topr run` (default: the latest finished one)")
    p.add_argument("--experiment", default="topr", help="experiment to look in when no --run-id is given (default topr)")
    args = p.parse_args(argv)
    info = common.setup(args)
    import logging

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    from topr.tracking import mlflow_client

    client = mlflow_client(args.tracking_uri)
    parent = parent_run(client, args.run_id, args.experiment)
    if parent.info.end_time is None:
        raise SystemExit(f"run {parent.info.run_id} has not finished")
    total = (parent.info.end_time - parent.info.start_time) / 1000
    rows = stage_rows(client, parent)
    sample_inrun = [r["wall"] - r["compute"] for r in rows if r["stage"] == "sample" and r["compute"]]
    eval_load = statistics.median(sample_inrun) if sample_inrun else 0.0
    for row in rows:
        row["overhead"] = row["wall"] - row["compute"]
        row["estimated_compute"] = max(0.0, row["compute"] - eval_load) if row.get("upper_bound") else row["compute"]
    compute = sum(r["compute"] for r in rows)
    estimated = sum(r["estimated_compute"] for r in rows)
    in_stages = sum(r["wall"] for r in rows)
    between = total - in_stages
    share, estimated_share = 1 - compute / total, 1 - estimated / total
    by_kind: dict[str, float] = {}
    for row in rows:
        by_kind[row["stage"]] = by_kind.get(row["stage"], 0.0) + row["overhead"]
    table_rows = [
        {"run": r["run"], "wall": r["wall"], "compute": r["compute"], "overhead": r["overhead"], "what": r["kind"] + (f"; save {r['save']:.1f} s" if "save" in r else "")}
        for r in rows
    ]
    table_rows.append({"run": "between stage runs", "wall": between, "compute": 0.0, "overhead": between, "what": "task processes start, imports, kfp.local"})
    table_rows.append({"run": "**whole run**", "wall": total, "compute": compute, "overhead": total - compute, "what": f"overhead {share:.1%} of the run"})
    text = (
        f"run {parent.info.run_name} ({parent.info.run_id}) in {args.tracking_uri}: {total:.1f} s from start to end\n\n"
        + common.table(
            table_rows,
            [("run", "stage run", ""), ("wall", "wall s", ".1f"), ("compute", "model compute s", ".1f"), ("overhead", "overhead s", ".1f"), ("what", "compute counted", "")],
        )
        + f"\n\noverhead share: {share:.1%} (lower bound: evaluate runs counted as all compute); "
        + f"estimated {estimated_share:.1%} (evaluate runs less {eval_load:.1f} s each, the sample runs' median in-run overhead)"
        + f"\ntarget ≤ {TARGET:.0%}: {'met' if estimated_share <= TARGET else 'MISSED'}"
    )
    results = {
        "tracking_uri": args.tracking_uri,
        "run_id": parent.info.run_id,
        "wall_seconds": total,
        "compute_seconds": compute,
        "estimated_compute_seconds": estimated,
        "overhead_share_lower_bound": share,
        "overhead_share_estimated": estimated_share,
        "between_stage_runs_seconds": between,
        "overhead_by_stage": by_kind,
        "stages": rows,
    }
    common.finish(args, "run_overhead", info, results, text)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
