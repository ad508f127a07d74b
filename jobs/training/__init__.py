"""The training job's parts; :mod:`jobs.training.job` runs them (the recipe, ``dpn train`` and
``python -m jobs.train``).

- :mod:`jobs.training.config`: :class:`TrainConfig` and its sections (``configs/train_*.yaml``: every key).
- :mod:`jobs.training.driver`: what the driver builds before the workers start: paths, data, the loop's spec,
  the ``TorchTrainer``.
- :mod:`jobs.training.loop`: the Ray Train worker loop (model loading, DeepSpeed engine, steps, checkpoints).
- :mod:`jobs.training.job`: the recipe (setup -> train -> cleanup, MLflow) and the command line.

Importing the package imports none of them.
"""
