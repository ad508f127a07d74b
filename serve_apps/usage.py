"""A request's `usage`: its tokens, the visual tokens each decoder layer kept, the experts chosen, the FLOPs saved.

No Ray here. The prefill part is read from the model's output ([`prefill_usage`], once per batch); the answer's
usage adds the completion tokens ([`completion_usage`]). The ingress returns it in OpenAI's `usage` object and
serve_apps.metrics records it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dpn_model import flops as flops_lib


def prefill_usage(
    config: Any, out: Any, prompt_lens: Sequence[int], requests: Sequence[Any], rate: Any
) -> list[dict[str, Any]]:
    """Per request of a prefill: prompt tokens, visual tokens per decoder layer, compression requested and run,
    compression per pooling layer, and prefill FLOPs spent, dense and saved.

    Args:
        config: the model's `DPNConfig`.
        out: the prefill's output (`layer_seq_lens`, `visual_tokens`, `expert_choices`, `prefill_flops`).
        prompt_lens: each row's prefilled length (its prompt, and the tokens a resumed row had generated).
        requests: the batch's `Prepared` requests, row by row.
        rate: the rate the batch ran at.
    """
    factors = list(config.compression_factors)
    usage = []
    for i, req in enumerate(requests):
        prompt_len = int(prompt_lens[i])
        has_image = req.pixel_values is not None
        visual0 = int(out.visual_tokens[i, 0]) if has_image else 0
        text_len = prompt_len - visual0
        per_layer = [int(length) - text_len for length in out.layer_seq_lens[i].tolist()]
        choices = [int(c) for c in out.expert_choices[i].tolist()]
        spent = float(out.prefill_flops[i])
        dense = float(
            flops_lib.prefill_flops(
                config,
                [prompt_len] * config.text_config.num_hidden_layers,
                num_images=int(has_image),
                lm_head_tokens=1,
                num_routed_layers=0,
            )
        )
        usage.append(
            {
                "prompt_tokens": len(req.input_ids),
                "visual_tokens_per_layer": per_layer if has_image else [],
                "compression_per_pooling_layer": [factors[c] if c >= 0 else None for c in choices]
                if has_image
                else [],
                "compression_requested": req.compression,
                "compression_run": rate,
                "prefill_flops": spent,
                "prefill_flops_dense": dense,
                "prefill_flops_saved": round(1.0 - spent / dense, 6) if dense else 0.0,
            }
        )
    return usage


def completion_usage(prefill: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
    """A finished request's usage: its prefill's, the tokens it generated, and the total."""
    usage = dict(prefill, completion_tokens=completion_tokens)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


__all__ = ["completion_usage", "prefill_usage"]
