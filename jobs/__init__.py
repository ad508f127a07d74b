"""Entry points submitted with `ray job submit` (train, evaluate, retrain) and the `dpn` CLI."""
