"""`ray job submit` entry points: train, evaluate, retrain, and the quickstart (`dpn` runs them too)."""
