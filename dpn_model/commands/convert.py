"""`dpn convert`: LLaVA weights to a DPN checkpoint directory.

dpn convert --llava DIR --out DIR                             # a llava-hf checkpoint (llava-1.5-7b-hf)
dpn convert --llm DIR --vision DIR --projector FILE --out DIR  # LLaVA-1.5 stage-1 parts (the paper's start)
"""

from __future__ import annotations

import argparse


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer numbers such as 8,16,24, got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--llava", help="local llava-hf checkpoint directory (weights + tokenizer)")
    source.add_argument(
        "--llm",
        help="local Llama/Vicuna directory (LlamaForCausalLM + tokenizer, e.g. vicuna-7b-v1.5): assemble "
        "LLaVA-1.5's stage-1 model from parts (needs --vision and --projector)",
    )
    parts = parser.add_argument_group("stage-1 parts (with --llm)")
    parts.add_argument(
        "--vision",
        help="local CLIP vision directory (CLIPVisionModel, or a full CLIPModel such as "
        "clip-vit-large-patch14-336: its vision half); its preprocessor_config.json sets the images",
    )
    parts.add_argument(
        "--projector",
        help="stage-1 projector: LLaVA's mm_projector.bin (read with torch.load(weights_only=True), "
        "never unpickled in full) or a .safetensors file, or the stage-1 output directory",
    )
    parts.add_argument(
        "--vision-feature-layer",
        type=int,
        default=-2,
        help="CLIP hidden state that feeds the projector (default -2, the penultimate layer, as LLaVA-1.5)",
    )
    parser.add_argument("--out", required=True, help="output directory for the DPN checkpoint")
    parser.add_argument(
        "--pooling-layers",
        type=_int_list,
        default=None,
        help="pool after these decoder layers, e.g. 8,16,24 (default: 1/4, 1/2, 3/4 depth)",
    )
    parser.add_argument(
        "--pooling-type", choices=["max", "avg", "conv"], default=None, help="pooling experts (default: max)"
    )
    parser.add_argument(
        "--router-temperature", type=float, default=None, help="router softmax temperature (default: 10)"
    )


def run(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("--vision", args.vision), ("--projector", args.projector)) if value]
    if args.llava and (given or args.vision_feature_layer != -2):
        raise SystemExit(
            f"dpn convert: {', '.join(given) or '--vision-feature-layer'} only applies with --llm "
            f"(a llava-hf directory already holds its vision tower and projector)"
        )
    if args.llm and len(given) < 2:
        raise SystemExit("dpn convert: --llm needs --vision DIR and --projector FILE (the stage-1 parts)")

    from dpn_model.convert import convert_llava_checkpoint, convert_llava_parts

    # unset options keep DPNConfig's defaults (the reference recipe's)
    options = {
        key: value
        for key, value in (
            ("pooling_layers", args.pooling_layers),
            ("pooling_type", args.pooling_type),
            ("router_temperature", args.router_temperature),
        )
        if value is not None
    }
    if args.llava:
        out = convert_llava_checkpoint(args.llava, args.out, **options)
    else:
        out = convert_llava_parts(
            args.llm,
            args.vision,
            args.projector,
            args.out,
            vision_feature_layer=args.vision_feature_layer,
            **options,
        )
    print(f"DPN checkpoint written to {out}")
    return 0
