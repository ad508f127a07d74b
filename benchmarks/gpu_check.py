"""The Python steps of benchmarks/gpu_check.sh: a bf16 prefill benchmark on random weights and one served request.

    python benchmarks/gpu_check.py prefill --preset llava-1.5-7b --device cuda --out DIR
    python benchmarks/gpu_check.py serve --model CHECKPOINT_DIR --device cuda --out DIR

`prefill` builds random weights of a preset directly on the device in the requested dtype (no fp32 copy on the
CPU first), prefills one batch of image questions (visual tokens + a short prompt, built from the config's token
ids: no tokenizer needed, so the 7B shapes work without a llava-hf checkpoint) at compression 1 (dense), 2, 4 and
auto, and prints each mode's wall time against dense next to the analytic FLOPs ratio (`dpn_model.flops`). The
modes are interleaved repeat by repeat so that clock and thermal drift hit them alike.

`serve` starts a local Ray, deploys `serve_apps.app:build_app` (the same app as configs/serve_*.yaml) with the
given device and dtype, sends one chat completion with an image through HTTP, prints the answer and checks that
the replica runs the requested dtype.

Both write JSON results under `--out` and exit non-zero on any failure (non-finite logits included).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

MODES: list[str | int] = [1, 2, 4, "auto"]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- prefill


def build_random(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised model of `preset`, allocated on `device` in `dtype` from the start.

    Presets with built-in token ids (the 7B shapes) need no tokenizer; the others get the locally trained one.
    """
    from dpn_model.modeling import DPNForConditionalGeneration
    from dpn_model.presets import PRESETS, preset_config, token_ids

    torch.manual_seed(seed)
    if "token_ids" in PRESETS[preset]:
        config = preset_config(preset)
    else:
        from dpn_model.tokenization import build_tokenizer

        config = preset_config(preset, **token_ids(build_tokenizer()))
    with torch.device(device):  # parameters are created (and initialised) on the device, in dtype
        model = DPNForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def make_batch(
    config: Any, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> dict[str, Any]:
    """`batch` image questions: BOS, a system prompt, the image's visual tokens, a question, `<router>`, and the
    assistant prefix; random text ids below the special ids, random pixels. Same length (no padding)."""
    generator = torch.Generator().manual_seed(seed)
    tc = config.text_config
    vocab = tc.vocab_size
    bos = tc.bos_token_id if tc.bos_token_id is not None else 1
    special = {config.image_token_id, config.router_token_id, tc.pad_token_id, bos, tc.eos_token_id} - {None}
    # ordinary ids lie between the low special ids (tiny: 0-5; Llama: 0-2) and the high ones (llava-hf: 32000+)
    text_lo = 1 + max((i for i in special if i < vocab // 2), default=2)
    text_hi = min((i for i in special if i >= vocab // 2), default=vocab)

    def text(n: int) -> torch.Tensor:
        return torch.randint(text_lo, text_hi, (batch, n), generator=generator)

    column = torch.full((batch, 1), 0, dtype=torch.long)
    ids = torch.cat(
        [
            column + bos,
            text(32),  # system prompt
            column.expand(-1, config.num_visual_tokens) + config.image_token_id,
            text(24),  # question
            column + config.router_token_id,
            text(6),  # "ASSISTANT:"
        ],
        dim=1,
    )
    side = config.vision_config.image_size
    pixels = torch.randn(batch, 3, side, side, generator=generator)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
    }


def prefill(args: argparse.Namespace) -> int:
    """Time prefill per mode against the analytic FLOPs; see the module docstring."""
    from dpn_model.flops import estimate, prefill_flops_batch

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = build_random(args.preset, device, dtype)
    sync(device)
    params = sum(p.numel() for p in model.parameters())
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype != dtype} | {
        str(p.device) for p in model.parameters() if p.device.type != device.type
    }
    if wrong:
        raise RuntimeError(f"parameters not all {dtype} on {device}: {sorted(wrong)}")
    build_s = time.perf_counter() - start
    log(f"built {args.preset} ({params / 1e6:,.1f} M params, {dtype}, {device}) in {build_s:.1f} s")

    config = model.config
    inputs = make_batch(config, args.batch, torch.device("cpu") if device.type == "meta" else device, dtype)
    seq_len = inputs["input_ids"].shape[1]
    if device.type == "meta":  # shapes only (a CPU check of the 7B build): the analytic FLOPs, nothing timed
        text_len = seq_len - config.num_visual_tokens
        dense = estimate(config, text_len, 1, lm_head_tokens=1)["total"]
        ratios = {c: estimate(config, text_len, c, lm_head_tokens=1)["total"] / dense for c in (2, 4)}
        log(f"analytic prefill FLOPs vs dense at {seq_len} tokens: 2x {ratios[2]:.3f}, 4x {ratios[4]:.3f}")
        return 0
    log(f"batch {args.batch} x {seq_len} tokens ({config.num_visual_tokens} visual per sample)")
    flops, padded, choices, times = {}, {}, {}, {m: [] for m in MODES}
    with torch.inference_mode():
        for mode in MODES:  # warm-up, correctness, and the analytic FLOPs of each mode
            out = model(**inputs, compression=mode, use_cache=False, logits_to_keep=1)
            if not bool(torch.isfinite(out.logits).all()):
                raise RuntimeError(f"non-finite logits at compression {mode}")
            flops[mode] = float(out.prefill_flops.mean())
            longest = out.layer_seq_lens.max(0, keepdim=True).values.expand_as(out.layer_seq_lens)
            has_image = out.visual_tokens[:, 0] > 0
            padded[mode] = float(
                prefill_flops_batch(
                    config,
                    longest,
                    has_image,
                    lm_head_tokens=torch.ones_like(has_image, dtype=torch.long),
                    num_routed_layers=None if mode == "auto" else 0,
                ).mean()
            )
            choices[mode] = out.expert_choices.tolist()
        sync(device)
        for _ in range(args.repeats):
            for mode in MODES:
                sync(device)
                t0 = time.perf_counter()
                model(**inputs, compression=mode, use_cache=False, logits_to_keep=1)
                sync(device)
                times[mode].append(time.perf_counter() - t0)

    dense_t, dense_f, dense_p = statistics.median(times[1]), flops[1], padded[1]
    rows = []
    for mode in MODES:
        t = statistics.median(times[mode])
        rows.append(
            {
                "mode": "dense" if mode == 1 else (f"{mode}x" if mode != "auto" else "auto"),
                "ms": t * 1e3,
                "time_ratio": t / dense_t,
                "flops_ratio": flops[mode] / dense_f,
                "padded_flops_ratio": padded[mode] / dense_p,
                "time_over_flops": (t / dense_t) / (flops[mode] / dense_f),
                "time_over_padded": (t / dense_t) / (padded[mode] / dense_p),
                "tflops_per_s": flops[mode] * args.batch / t / 1e12,  # analytic FLOPs / wall time
            }
        )
    print(
        f"\nprefill, {args.preset}, {dtype}, {device}, batch {args.batch} x {seq_len}, median of {args.repeats}"
    )
    print(
        "| mode | ms / batch | time vs dense | FLOPs vs dense | padded FLOPs vs dense | time / FLOPs ratio | TFLOP/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['ms']:.1f} | {r['time_ratio']:.2f} | {r['flops_ratio']:.2f} | "
            f"{r['padded_flops_ratio']:.2f} | {r['time_over_flops']:.2f} | {r['tflops_per_s']:.3g} |"
        )
    print(f"auto expert choices per sample and pooling layer: {choices['auto']}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if peak is not None:
        print(f"peak GPU memory {peak:.1f} GiB")
    result = {
        "preset": args.preset,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": args.dtype,
        "params": params,
        "build_s": build_s,
        "batch": args.batch,
        "seq_len": seq_len,
        "repeats": args.repeats,
        "rows": rows,
        "auto_choices": choices["auto"],
        "peak_gib": peak,
        "torch": torch.__version__,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prefill.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------------- serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_data_url(side: int = 64) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def serve_one(args: argparse.Namespace) -> int:
    """Deploy the Serve app on a local Ray, answer one request over HTTP, check the replica's dtype."""
    import httpx
    import ray
    from ray import serve

    from serve_apps.app import build_app

    on_gpu = args.device.startswith("cuda")
    port = _free_port()
    app = build_app(
        {
            "model": args.model,
            "version": "gpu-check",
            "auth": "none",  # a loopback check endpoint
            "served_model_name": "dpn",
            "device": args.device,
            "dtype": args.dtype,
            "default_compression": "auto",
            "model_options": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if on_gpu else 0}},
        }
    )
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        start = time.perf_counter()
        serve.run(app, name="dpn", route_prefix="/")
        log(f"deployed {args.model} ({args.device}, {args.dtype}) in {time.perf_counter() - start:.1f} s")
        info = serve.get_deployment_handle("DPNServer", app_name="dpn").info.remote().result(timeout_s=60)
        log(f"replica: device {info['device']}, dtype {info['dtype']}")
        headers = (
            {"Authorization": f"Bearer {os.environ['DPN_API_KEY']}"} if os.environ.get("DPN_API_KEY") else {}
        )
        body = {
            "model": "dpn",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _png_data_url()}},
                        {"type": "text", "text": "What colour is the big shape?"},
                    ],
                }
            ],
            "max_tokens": 16,
            "temperature": 0,
            "compression": "auto",
        }
        start = time.perf_counter()
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers, timeout=120
        )
        latency = time.perf_counter() - start
        print(f"HTTP {response.status_code} in {latency:.2f} s")
        payload = response.json()
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "serve.json").write_text(json.dumps({"info": info, "response": payload}, indent=1) + "\n")
        if response.status_code != 200:
            print(json.dumps(payload, indent=1))
            return 1
        print(f"answer: {payload['choices'][0]['message']['content']!r}")
        print(
            f"finish_reason: {payload['choices'][0]['finish_reason']}, usage: {json.dumps(payload.get('usage'))}"
        )
        if info["dtype"] != args.dtype or (on_gpu != info["device"].startswith("cuda")):
            print(f"replica runs {info['device']} {info['dtype']}, asked for {args.device} {args.dtype}")
            return 1
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prefill", help="time prefill dense vs 2x / 4x / auto on random weights")
    p.add_argument("--preset", default="llava-1.5-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True)
    s = sub.add_parser("serve", help="deploy the Serve app locally and answer one request")
    s.add_argument("--model", required=True, help="checkpoint directory, MLflow URI or preset:NAME")
    s.add_argument("--device", default="cuda")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    s.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "prefill" and args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu (benchmarks/gpu_check.sh --dry-run)", file=sys.stderr)
        return 2
    return prefill(args) if args.command == "prefill" else serve_one(args)


if __name__ == "__main__":
    sys.exit(main())
