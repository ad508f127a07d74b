"""The jobs, one package each: :mod:`jobs.training`, :mod:`jobs.evaluation`, :mod:`jobs.retraining`; beside them
what they share (:mod:`jobs.config`, :mod:`jobs.console`), the quickstart, the local stack, and the
`python -m jobs.train|evaluate|retrain` entry points that `ray job submit` runs (`dpn` runs the jobs too)."""
