"""The evaluation's batch inference: the Ray Data ``Predictor`` actor, its model loading, and :func:`predict`.

:func:`predict` builds one model's lazy dataset: ``pipelines.datasets.build_eval_dataset`` (read, tokenise,
decode images; bad samples counted), then ``map_batches(Predictor, compute=ActorPoolStrategy(size=num_actors))``
with one GPU per actor on GPU clusters (:mod:`jobs.evaluation.resources`). Each actor loads the model once,
generates greedily in every requested mode on the same batch and scores the answers with the config's task
(:mod:`jobs.evaluation.tasks`; exact match by default). The prefill's own outputs (FLOPs, routing) are read with a
forward hook on ``generate``'s first forward call - no second forward.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs.evaluation.config import EvalConfig, ModelSpec
from jobs.evaluation.resources import cpu_budget, use_gpus
from jobs.evaluation.scoring import first_line
from jobs.evaluation.tasks import DEFAULT_TASK, EvalTask, get_task, score_answers

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# The model's config
# ----------------------------------------------------------------------------------------------


def load_model_config(model_dir: str) -> Any:
    """The DPN config of the model in ``model_dir`` (no weights loaded).

    Raises:
        ValueError: the directory holds another kind of model.
    """
    from transformers import AutoConfig

    import dpn_model  # noqa: F401 - registers dpn_llava with the Auto classes

    config = AutoConfig.from_pretrained(model_dir)
    if not hasattr(config, "compression_factors"):
        raise ValueError(f"{model_dir} holds a {config.model_type!r} model, not a DPN model (dpn_llava)")
    return config


# ----------------------------------------------------------------------------------------------
# Ray Data batch inference
# ----------------------------------------------------------------------------------------------


class Predictor:
    """``map_batches`` class: load the model once per actor; per batch, generate greedily in every
    compression mode and score the answers with the task (exact match by default).

    Args:
        model_dir: the driver's local model directory (used when this node sees it too).
        compressions: modes to run on every batch: ``"auto"``, ``"random"``, factors or schedule labels
            (``"1-2-4"``), each parsed with ``parse_compression`` against the model's config; modes that
            force the same experts (``"2"`` and ``"2-2-2"``) are generated once and reported under each label.
        max_new_tokens: generation budget (answers are short).
        device: ``"auto"`` (CUDA if visible), ``"cuda"`` or ``"cpu"``.
        tracking: MLflow tracking URI to resolve ``model_uri`` against.
        model_uri: the model's URI, resolved (downloaded) on this node when ``model_dir`` is not
            here (actors on other nodes of a cluster).
        task: how answers are scored: a registered task's name or the task (:mod:`jobs.evaluation.tasks`;
            default exact match).

    Returns per batch ``B * len(compressions)`` rows: ``id``, ``family``, ``kind``, ``question``,
    ``answer``, ``prediction``, ``correct``, ``compression`` (str), ``prefill_flops``,
    ``dense_flops``, ``image_flops`` (vision tower + projector, part of both), ``latency_s`` (the mode's batch generation time divided by ``B``),
    ``expert_choices`` ``(P,)``, ``visual_tokens`` ``(P+1,)``, ``router_probs`` ``(P, E)`` (NaN for
    forced modes), with ``P`` pooling layers and ``E`` experts.
    """

    def __init__(
        self,
        model_dir: str,
        compressions: Sequence[str | int],
        max_new_tokens: int,
        device: str = "auto",
        tracking: str | None = None,
        model_uri: str | None = None,
        task: str | EvalTask = DEFAULT_TASK,
    ):
        from tracking.models import load_model_and_processor_from_ref

        self.task = get_task(task)
        # The driver's folder where this node sees it, else the reference, resolved (downloaded) here; once
        # either way. dtype "auto": dpn_model's rule (bf16 on a GPU, fp32 on the CPU).
        ref = model_dir if Path(model_dir).is_dir() else (model_uri or model_dir)
        self.model, self.processor = load_model_and_processor_from_ref(ref, device, "auto", tracking)
        self.device = self.model.device
        self.config = self.model.config
        from dpn_model.configuration import forced_expert_indices, parse_compression, routing_mode

        self.compressions = [str(c) for c in compressions]
        # Each mode label ("auto", "2", "1-2-4") parsed once; modes that force the same expert at every
        # pooling layer ("2" and "2-2-2": the oracle's paths and the requested modes) generate only once.
        self._parsed = {mode: parse_compression(mode, self.config) for mode in self.compressions}
        self._keys = {
            mode: value if routing_mode(value) else tuple(forced_expert_indices(value, self.config))
            for mode, value in self._parsed.items()
        }
        self.max_new_tokens = max_new_tokens
        self.num_layers = len(self.config.pooling_layers)
        self.num_experts = len(self.config.compression_factors)
        self._prefill: dict[str, Any] | None = None
        # generate() returns token ids only; the prefill's FLOPs and routing are read from the first
        # forward call it makes (the prefill) with a standard PyTorch forward hook.
        self.model.register_forward_hook(self._capture_prefill)
        self._dense_cache: dict[tuple[int, bool], float] = {}
        from dpn_model import flops

        grid = self.config.vision_grid
        self.image_flops = float(
            flops.vision_tower_flops(self.config.vision_config)
            + flops.projector_flops(self.config, grid[0] * grid[1])
        )
        logger.info("predictor loaded %s on %s (%s)", ref, self.device, self.model.dtype)

    def _capture_prefill(self, module: Any, args: Any, output: Any) -> None:
        if self._prefill is None and getattr(output, "prefill_flops", None) is not None:
            self._prefill = {
                "prefill_flops": output.prefill_flops.detach().double().cpu().numpy(),
                "expert_choices": output.expert_choices.detach().cpu().numpy(),
                "visual_tokens": output.visual_tokens.detach().cpu().numpy(),
                "router_probs": None
                if output.router_probs is None
                else output.router_probs.detach().float().cpu().numpy(),
            }

    def dense_flops(self, text_len: int, has_image: bool) -> float:
        """Prefill FLOPs of a sample through the dense model (compression 1, no routers), with the
        lm_head on the single position ``generate`` computes logits for."""
        from dpn_model import flops

        key = (text_len, has_image)
        if key not in self._dense_cache:
            if has_image:
                lens = flops.layer_seq_lens_for(self.config, text_len, 1)
            else:
                lens = [text_len] * self.config.text_config.num_hidden_layers
            self._dense_cache[key] = float(
                flops.prefill_flops(
                    self.config, lens, num_images=int(has_image), lm_head_tokens=1, num_routed_layers=0
                )
            )
        return self._dense_cache[key]

    def _generate(
        self, inputs: dict[str, Any], compression: Any, rows: list[dict[str, str]]
    ) -> dict[str, Any]:
        """Greedy answers of one batch in one compression, scored against ``rows`` (their ``answer``) by the
        task, with the prefill's FLOPs and routing."""
        import torch

        tokenizer = self.processor.tokenizer
        size, prompt_len = inputs["input_ids"].shape
        self._prefill = None
        start = time.perf_counter()
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs, compression=compression, do_sample=False,
                max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # generation time, not launch time
        elapsed = time.perf_counter() - start
        if self._prefill is None:
            raise RuntimeError(
                "generate() made no prefill forward call with prefill_flops; is this a DPN model?"
            )
        texts = tokenizer.batch_decode(generated[:, prompt_len:], skip_special_tokens=True)
        predictions = [first_line(t).strip() for t in texts]
        probs = self._prefill["router_probs"]
        if probs is None:
            probs = np.full((size, self.num_layers, self.num_experts), np.nan, dtype=np.float32)
        return {
            "prediction": predictions,
            "correct": score_answers(self.task, predictions, rows),
            "prefill_flops": self._prefill["prefill_flops"],
            "latency_s": [elapsed / size] * size,
            "expert_choices": self._prefill["expert_choices"],
            "visual_tokens": self._prefill["visual_tokens"],
            "router_probs": probs,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.preprocess import collate_batch

        tokenizer = self.processor.tokenizer
        inputs = collate_batch(batch, tokenizer.pad_token_id, "left", self.processor.image_processor)
        image_mask = inputs.pop("image_mask").numpy()
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        size = inputs["input_ids"].shape[0]
        text_lens = inputs["attention_mask"].sum(-1) - (
            inputs["input_ids"] == self.config.image_token_id
        ).sum(-1)
        dense = np.array([self.dense_flops(int(t), bool(h)) for t, h in zip(text_lens.tolist(), image_mask)])
        image = np.where(image_mask, self.image_flops, 0.0)  # vision tower + projector: same in every mode
        answers = [str(a) for a in batch["answer"]]
        rows = [
            {"id": str(i), "family": str(f), "kind": str(k), "question": str(q), "answer": a}
            for i, f, k, q, a in zip(batch["id"], batch["family"], batch["kind"], batch["question"], answers)
        ]
        results: dict[Any, dict[str, Any]] = {}  # one generation per distinct computation
        out: dict[str, list[Any]] = defaultdict(list)
        for mode in self.compressions:
            key = self._keys[mode]
            if key not in results:
                results[key] = self._generate(inputs, self._parsed[mode], rows)
            for name, value in results[key].items():
                out[name].append(value)
            out["compression"] += [mode] * size
        repeat = len(self.compressions)
        return {
            "id": np.tile(np.asarray(batch["id"]).astype(str), repeat),
            "family": np.tile(np.asarray(batch["family"]).astype(str), repeat),
            "kind": np.tile(np.asarray(batch["kind"]).astype(str), repeat),
            "question": np.tile(np.asarray(batch["question"]).astype(str), repeat),
            "answer": np.tile(np.asarray(answers, dtype=str), repeat),
            "prediction": np.concatenate(out["prediction"]).astype(str),
            "correct": np.concatenate(out["correct"]).astype(bool),
            "compression": np.asarray(out["compression"], dtype=str),
            "prefill_flops": np.concatenate(out["prefill_flops"]).astype(np.float64),
            "dense_flops": np.tile(dense, repeat),
            "image_flops": np.tile(image, repeat),
            "latency_s": np.concatenate(out["latency_s"]).astype(np.float64),
            "expert_choices": np.concatenate(out["expert_choices"]).astype(np.int64),
            "visual_tokens": np.concatenate(out["visual_tokens"]).astype(np.int64),
            "router_probs": np.concatenate(out["router_probs"]).astype(np.float32),
        }


def predict(
    spec: ModelSpec, model_dir: str, cfg: EvalConfig, modes: Sequence[str | int] | None = None
) -> Any:
    """The lazy Ray Dataset of per-sample, per-mode results for one model, and its bad-sample
    accountant (``(dataset, accountant)``). ``modes``: what every actor runs on each batch (default the
    model's modes; ``--oracle`` adds the static paths, so all of them share one pass over the data)."""
    from pipelines.accounting import BadSampleAccountant
    from pipelines.datasets import actor_pool, build_eval_dataset

    gpus = use_gpus(cfg.device)
    actor_cpus, preprocess_cpus = cpu_budget(cfg, gpus)
    accountant = BadSampleAccountant(max_bad_fraction=cfg.max_bad_fraction)
    ds = build_eval_dataset(
        cfg.data, model_dir, cfg.split, max_length=cfg.max_length, accountant=accountant,
        image_folder=cfg.image_folder, policy=cfg.read_policy(), batch_size=max(cfg.batch_size, 16),
        num_cpus=preprocess_cpus,
    )  # fmt: skip
    if cfg.max_samples:
        ds = ds.limit(cfg.max_samples)
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "model_uri": spec.uri,
            "compressions": list(spec.compressions if modes is None else modes),
            "max_new_tokens": cfg.max_new_tokens,
            "device": "cuda" if gpus else "cpu",
            "tracking": cfg.tracking_uri,
            # the task itself, pickled (its functions by reference: importable on the workers, as every
            # entry of jobs/evaluation/tasks.py is)
            "task": get_task(cfg.task),
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=actor_pool(cfg.num_actors),
        num_gpus=1 if gpus else 0,
        num_cpus=actor_cpus,
    )
    return ds, accountant
