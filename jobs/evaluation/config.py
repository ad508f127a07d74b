"""The evaluation job's configuration (``configs/eval_*.yaml``, or ``dpn eval`` flags), as pydantic models.

``dpn eval --config configs/eval_tiny.yaml [key=value ...] [--flag ...]`` builds an :class:`EvalConfig` from the file,
the flags given (each replaces the file's value) and the overrides, in that order; without ``--config`` the flags
alone build it, as they always did. Every key, with its default, is listed here. Compression modes are parsed by
:func:`parse_compressions`, which calls ``dpn_model.configuration.parse_compression`` on each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from dpn_base.model_ref import ModelRef
from jobs.config import ConfigModel, load_config
from jobs.evaluation.tasks import DEFAULT_TASK, get_task
from pipelines.policy import ReadPolicy

DEFAULT_COMPRESSIONS = "auto,1,2,4"
DEFAULT_EXPERIMENT = "dpn-eval"


def split_modes(text: str) -> list[str]:
    """``"auto,1,[1,2,4],1-2-4"`` -> ``["auto", "1", "[1,2,4]", "1-2-4"]``: split at the commas outside
    brackets, so a bracketed schedule stays one mode (``1,2,4`` without brackets is three factors)."""
    parts, depth, current = [], 0, []
    for char in str(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"compression modes {text!r}: ']' without '['")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"compression modes {text!r}: '[' without ']'")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_compressions(text: str, config: Any | None = None) -> list[str | int]:
    """``"auto,1,2,4,[1,2,4]"`` -> ``["auto", 1, 2, 4, "1-2-4"]`` (order kept, duplicates dropped).

    Each mode is parsed by ``dpn_model.configuration.CompressionSpec.parse``: ``auto``, ``random``, an expert's
    factor (kept as an ``int``, as report rows always had it) or a schedule, one factor per pooling layer, as
    ``[1,2,4]`` or ``1-2-4`` (stored as its ``label``, ``"1-2-4"``).

    Args:
        text: comma-separated modes; a schedule inside the list needs brackets or dashes.
        config: the model's config; when given, factors must be its experts' and a schedule needs one factor
            per pooling layer (without it only the form is checked).

    Raises:
        ValueError: a mode that is not understood or does not fit the model, naming the mode.
    """
    from dpn_model.configuration import CompressionSpec

    modes: list[str | int] = []
    for part in split_modes(text):
        try:
            spec = CompressionSpec.parse(part, config)
        except ValueError as err:
            raise ValueError(f"compression mode {part!r} of {text!r}: {err}") from None
        mode: str | int = spec.factors if isinstance(spec.factors, int) else spec.label
        if mode not in modes:
            modes.append(mode)
    if not modes:
        raise ValueError(f"no compression mode in {text!r}; give e.g. 'auto,1,2,4' or 'auto,1-2-4'")
    return modes


def _modes_text(value: Any) -> str:
    """A YAML list of modes (``[auto, 1, [1, 2, 4]]``) as ``--compression`` text (``"auto,1,[1,2,4]"``)."""
    if not isinstance(value, (list, tuple)):
        return str(value)
    return ",".join(
        f"[{','.join(str(f) for f in mode)}]" if isinstance(mode, (list, tuple)) else str(mode)
        for mode in value
    )


class ModelSpec(ConfigModel):
    """One model to evaluate.

    Attributes:
        label: its name in the report, the tables and the plots.
        uri: the model reference (:class:`dpn_base.model_ref.ModelRef`): a local Hugging Face directory,
            ``runs:/<id>/model``, ``models:/<name>@<alias>`` / ``models:/<name>/3``, ``mlflow-artifacts:/...`` or
            ``preset:<name>``; parsed when the config loads and kept as its canonical text (:attr:`ref`: parsed).
        compressions: its modes, as a list or as ``--compression`` text (``auto,1,2,4``; schedules ``1-2-4`` or
            ``[1,2,4]``); parsed by :func:`parse_compressions`. Default ``auto,1,2,4``.
    """

    label: str
    uri: str
    compressions: list[str | int] = Field(default_factory=lambda: parse_compressions(DEFAULT_COMPRESSIONS))

    @field_validator("compressions", mode="before")
    @classmethod
    def _parse_modes(cls, value: Any) -> list[str | int]:
        return parse_compressions(_modes_text(value))

    @field_validator("uri")
    @classmethod
    def _parse_uri(cls, value: str) -> str:
        return str(ModelRef.parse(value))

    @property
    def ref(self) -> ModelRef:
        """``uri``, parsed."""
        return ModelRef.parse(self.uri)


class EvalConfig(ReadPolicy):
    """Everything one evaluation run needs (``configs/eval_*.yaml`` and the ``dpn eval`` flags of the same names).

    What the readers may open and hold are the top-level keys of :class:`pipelines.formats.ReadPolicy`
    (``allowed_image_roots``, ``allowed_image_schemes``, ``tar_compression``, byte and pixel caps,
    ``image_formats``), next to ``image_folder``; ``read_policy()`` is what the job hands the readers.

    Attributes:
        models: the models to evaluate, one after the other into the same report (``--model``, ``--compression``).
        data: dataset root / file / glob (synthetic benchmark in any format, LLaVA JSON, evaluation JSONL,
            WebDataset, Parquet; local or ``s3://``, ``gs://``).
        split: split of a dataset root (``null``, or ``--split none``: every file).
        batch_size: samples per generation batch.
        num_actors: inference actors (one GPU each on GPU clusters).
        max_new_tokens: generation budget per answer.
        max_samples: evaluate only the first this-many samples (``null``: all).
        max_length: longest prompt in tokens (longer: skipped, counted as bad).
        max_bad_fraction: fail past this fraction of bad samples.
        image_folder: folder relative image paths resolve against (``null``: the file's); a ref must stay inside
            it unless ``allowed_image_roots`` or ``allowed_image_schemes`` name more.
        device: ``auto`` (one GPU per actor when the cluster has GPUs), ``cpu`` or ``cuda``.
        cpus_per_actor: CPUs reserved per inference actor (``null``: 1 on GPU; on CPU, a share that leaves one
            CPU for reading).
        json_path: also write the JSON report here (``--json``).
        output_dir: where the report, plots and predictions go (``null``: ``runs/eval/<run_name or time>``).
        baselines: earlier reports whose rows are added to the table and plots (``--baseline``).
        experiment: MLflow experiment.
        run_name: MLflow run name.
        tracking_uri: MLflow tracking URI (``null``: ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``).
        mlflow: log the run to MLflow (``--no-mlflow``: false).
        title: title of the accuracy-vs-FLOPs plot.
        oracle: also evaluate every static path and report the oracle router (``jobs/evaluation/oracle.py``).
        dial: the cost dial's sweep (``--dial``): a model evaluated in ``auto`` is also evaluated at each
            ``auto:lambda=X`` (``dpn_model.configuration.parse_compression``), one curve of accuracy against FLOPs
            from one trained model.
        task: how answers are scored, a task registered in ``jobs/evaluation/tasks.py`` (default ``exact_match``).
    """

    models: list[ModelSpec] = Field(min_length=1)
    data: str
    split: str | None = "eval"
    batch_size: int = Field(16, ge=1)
    num_actors: int = Field(1, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    max_samples: int | None = Field(None, ge=1)
    max_length: int = Field(2048, ge=1)
    max_bad_fraction: float = 0.01
    image_folder: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpus_per_actor: float | None = None
    json_path: str | None = None
    output_dir: str | None = None
    baselines: list[str] = Field(default_factory=list)
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    tracking_uri: str | None = None
    mlflow: bool = True
    title: str = ""
    oracle: bool = False
    dial: list[float] = Field(default_factory=list)
    task: str = DEFAULT_TASK

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        return get_task(value).name


def load_eval_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    data: dict[str, Any] | None = None,
) -> EvalConfig:
    """Load an evaluation config file, ``data`` (e.g. the flags given) merged over it, then ``key=value`` overrides
    (see :func:`jobs.config.load_config`)."""
    return load_config(EvalConfig, path, overrides, data)


__all__ = [
    "DEFAULT_COMPRESSIONS",
    "DEFAULT_EXPERIMENT",
    "EvalConfig",
    "ModelSpec",
    "load_eval_config",
    "parse_compressions",
    "split_modes",
]
