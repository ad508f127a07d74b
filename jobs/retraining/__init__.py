"""The retraining job's parts; :mod:`jobs.retraining.job` runs them (``dpn retrain`` and
``python -m jobs.retrain``).

- :mod:`jobs.retraining.config`: :class:`RetrainConfig` (``configs/retrain_*.yaml``).
- :mod:`jobs.retraining.shards`: data shards under ``data.root``: discovery, the training mix, its state
  files.
- :mod:`jobs.retraining.gate`: the promotion decision and the comparison table.
- :mod:`jobs.retraining.job`: the cycle (discover -> train -> evaluate -> gate -> promote) and the command
  line.

Importing the package imports none of them.
"""
