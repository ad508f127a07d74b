"""`dpn convert --llava DIR --out DIR`: a llava-hf checkpoint directory to a DPN one."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llava", required=True, help="local llava-hf checkpoint directory (weights + tokenizer)")
    parser.add_argument("--out", required=True, help="output directory for the DPN checkpoint")
    parser.add_argument(
        "--pooling-layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
        help="pool after these decoder layers, e.g. 8,16,24 (default: 1/4, 1/2, 3/4 depth)",
    )
    parser.add_argument("--pooling-type", choices=["max", "avg", "conv"], default="max")
    parser.add_argument("--router-temperature", type=float, default=10.0)


def run(args: argparse.Namespace) -> int:
    from dpn_model.convert import convert_llava_checkpoint

    options = {"pooling_type": args.pooling_type, "router_temperature": args.router_temperature}
    if args.pooling_layers:
        options["pooling_layers"] = args.pooling_layers
    out = convert_llava_checkpoint(args.llava, args.out, **options)
    print(f"DPN checkpoint written to {out}")
    return 0
