"""A tiny random checkpoint and a synthetic eval set on disk, shared by the evaluation and oracle job tests."""

from __future__ import annotations

from pathlib import Path


def make_eval_workspace(root: Path, num_eval: int) -> dict:
    """`tiny` preset checkpoint under root/ckpt, `num_eval` synthetic parquet eval samples under root/data and an
    sqlite MLflow tracking URI beside them."""
    from dpn_model.presets import create_checkpoint
    from pipelines.synthetic import write_synthetic_dataset

    ckpt = create_checkpoint("tiny", str(root / "ckpt"), seed=0)
    write_synthetic_dataset(root / "data", "parquet", num_train=0, num_eval=num_eval, seed=1)
    return {
        "root": root,
        "ckpt": ckpt,
        "data": str(root / "data"),
        "tracking": f"sqlite:///{root / 'mlflow.db'}",
    }


def preprocessed_eval_batch(ckpt: str, n: int = 3) -> dict:
    """`n` synthetic eval samples as data rows, preprocessed for `ckpt` as the eval job's input path does."""
    from pipelines.preprocess import Preprocessor
    from pipelines.synthetic import data_rows, generate_samples

    return Preprocessor(ckpt, 2048, "eval")(data_rows(list(generate_samples(n, seed=7, tag="eval"))))
