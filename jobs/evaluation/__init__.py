"""The evaluation job's parts; :mod:`jobs.evaluation.job` runs them (orchestration, ``dpn eval`` and
``python -m jobs.evaluate``).

- :mod:`jobs.evaluation.config`: :class:`EvalConfig` / :class:`ModelSpec` (``configs/eval_*.yaml`` and the flags),
  compression-mode parsing.
- :mod:`jobs.evaluation.tasks`: the task/metric registry (how answers are scored; exact match by default). A new
  benchmark metric is one ``register_task(...)`` entry there.
- :mod:`jobs.evaluation.scoring`: answer normalisation and exact match.
- :mod:`jobs.evaluation.predictor`: the Ray Data ``Predictor`` actor, model loading and :func:`predict`.
- :mod:`jobs.evaluation.resources`: Ray start-up, GPUs per actor and the CPU budget.
- :mod:`jobs.evaluation.report`: per-sample results -> report rows, tables, JSON, plots.
- :mod:`jobs.evaluation.oracle`: every static path and the oracle router (``--oracle``).
- :mod:`jobs.evaluation.mlflow_log`: the MLflow run (params, metrics, artifacts).
- :mod:`jobs.evaluation.job`: the orchestration and the command line.

Importing the package imports none of them.
"""
