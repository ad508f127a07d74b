"""`dpn info --preset NAME | --model DIR`: parameters and what DPN saves in prefill FLOPs."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dpn_model import DPNConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", default=None, help="a preset name: tiny, mid, llava-1.5-7b (default: tiny)"
    )
    source.add_argument("--model", default=None, help="a local DPN checkpoint directory")
    parser.add_argument("--text-tokens", type=int, default=64, help="non-image tokens of the example prompt")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def run(args: argparse.Namespace) -> int:
    import json

    config, name = _config(args)
    report = _report(config, name, args.text_tokens)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _config(args: argparse.Namespace) -> tuple[DPNConfig, str]:
    """The config to describe and its display name: a checkpoint's own config, or a preset's (`tiny` by default).

    A preset without token ids gets the tiny tokenizer's (vocabulary 1024, `<image>` 4, `<router>` 5), which is
    all the counts below need.
    """
    from dpn_model import DPNConfig
    from dpn_model.presets import PRESETS, preset_config

    if args.model:
        return DPNConfig.from_pretrained(args.model), args.model
    name = args.preset or "tiny"
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    ids = PRESETS[name].get("token_ids") or dict(vocab_size=1024, image_token_id=4, router_token_id=5)
    return preset_config(name, **ids), name


def _report(config: DPNConfig, name: str, text_tokens: int) -> dict[str, Any]:
    """Parameter counts and, per compression factor, the prefill FLOPs of one image + `text_tokens` text tokens."""
    import torch

    from dpn_model import DPNForConditionalGeneration
    from dpn_model.flops import estimate

    with torch.device("meta"):  # shapes only: the 7B preset is counted without allocating its weights
        model = DPNForConditionalGeneration(config)
    rows = []
    for factor in config.compression_factors:
        est = estimate(config, text_tokens, factor, lm_head_tokens=1)
        rows.append(
            {
                "compression": factor,
                "prefill_flops": est["total"],
                "saving": est["saving"],
                "visual_tokens_per_layer": est["visual_tokens_per_layer"],
            }
        )
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "router_parameters": sum(p.numel() for p in model.model.pyramid.parameters()),
        "visual_grid": list(config.vision_grid),
        "pooling_layers": config.pooling_layers,
        "decoder_layers": config.text_config.num_hidden_layers,
        "text_tokens": text_tokens,
        "modes": rows,
    }


def _print_table(report: dict[str, Any]) -> None:
    """The report as a short table for a person: one row per fixed compression, `auto` between them."""
    grid = report["visual_grid"]
    print(
        f"DPN {report['model']}: {_human(report['parameters'])} parameters "
        f"({report['router_parameters']:,} in the routers)"
    )
    print(
        f"visual grid {grid[0]}x{grid[1]}, pooling after decoder layers "
        f"{report['pooling_layers']} of {report['decoder_layers']}"
    )
    print(f"prefill of one image + {report['text_tokens']} text tokens:")
    print(f"  {'mode':<8}{'FLOPs':>12}{'vs dense':>10}   visual tokens per decoder layer")
    for row in report["modes"]:
        label = "dense" if row["compression"] == 1 else f"{row['compression']}x"
        ratio = 1 - row["saving"]
        print(
            f"  {label:<8}{_human(row['prefill_flops']):>12}{ratio:>9.0%}   {row['visual_tokens_per_layer']}"
        )
    print("  auto    the router picks 1x/2x/4x per sample and pooling layer: between the rows above")
