"""Calibrate the synthetic benchmark: which question families does the tiny DPN learn, densely and pooled?

Trains the real ``DPNForConditionalGeneration`` of the tiny preset (``dpn_model.presets``, random
init) in one process with plain PyTorch AdamW, no Ray, on in-memory synthetic samples, with the
compression forced to one rate (1 = dense, 2, 4) or left to the router (``auto``). Every
``--eval-every`` steps it reports held-out exact-match accuracy per family (teacher forced: every
answer token and the closing ``</s>`` must be the argmax, which is what greedy decoding returns).

    python benchmarks/calibrate_synthetic.py --compression 1 --steps 600
    python benchmarks/calibrate_synthetic.py --compression 4 --steps 600

Each evaluation line (``EVAL {...}``) is printed as JSON; ``--json OUT`` also writes the learning
curve. Findings are kept in ``benchmarks/results/calibration.md``. This is a quick bench for
designing the benchmark; the training job (``dpn train``) is what ``benchmarks/quality.py`` uses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpn_model.presets import build_model  # noqa: E402
from pipelines.synthetic import FAMILIES, FAMILY_KIND, generate_splits  # noqa: E402

IGNORE = -100


def encode(samples, processor) -> list[tuple[list[int], list[int], np.ndarray, str]]:
    """(input_ids, labels, uint8 image, family) per sample, with the training job's chat template."""
    out = []
    for s in samples:
        ids = processor.encode(s.conversations(), has_image=True)
        pixels = processor.image_processor.to_uint8(PIL.Image.fromarray(s.image))[0]
        out.append((ids["input_ids"], ids["labels"], pixels, s.family))
    return out


def collate(items, processor) -> dict[str, torch.Tensor]:
    pad = processor.tokenizer.pad_token_id
    length = max(len(x[0]) for x in items)
    input_ids = torch.full((len(items), length), pad)
    labels = torch.full((len(items), length), IGNORE)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, (ids, labs, _, _) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(labs)
        attention_mask[i, : len(ids)] = 1
    pixel_values = processor.image_processor.normalize(np.stack([x[2] for x in items]))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
    }


def answer_correct(out, labels: torch.Tensor) -> torch.Tensor:
    """Per sample: every label token is the argmax of the logits before it (output positions may be
    fewer than input positions once visual tokens are pooled; ``token_positions`` maps them back)."""
    length = labels.shape[1]
    pos = out.token_positions  # (B, out_len), input index of each output position, -1 for pooled/padding
    target_pos = (pos + 1).clamp(0, length - 1)
    target = labels.gather(1, target_pos)
    target = torch.where((pos >= 0) & (pos + 1 < length), target, torch.full_like(target, IGNORE))
    return ((out.logits.argmax(-1) == target) | (target == IGNORE)).all(-1)


@torch.no_grad()
def evaluate(model, data, processor, compression) -> dict:
    model.eval()
    hits: dict[str, list[bool]] = {}
    choices: dict[str, list[float]] = {}
    for start in range(0, len(data), 64):
        items = data[start : start + 64]
        batch = collate(items, processor)
        out = model(**batch, compression=compression)
        ok = answer_correct(out, batch["labels"])
        for i, item in enumerate(items):
            hits.setdefault(item[3], []).append(bool(ok[i]))
            factors = torch.tensor(model.config.compression_factors)[out.expert_choices[i].clamp(min=0)]
            choices.setdefault(FAMILY_KIND[item[3]], []).append(float(factors.float().mean()))
    model.train()
    acc = {family: round(100 * float(np.mean(v)), 1) for family, v in sorted(hits.items())}
    for kind in ("coarse", "fine"):
        acc[kind] = round(float(np.mean([a for f, a in acc.items() if FAMILY_KIND.get(f) == kind])), 1)
    acc["mean_pooling_factor"] = {kind: round(float(np.mean(v)), 2) for kind, v in choices.items()}
    return acc


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compression", default="1", choices=["auto", "1", "2", "4"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-eval", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--json", type=Path, help="write the learning curve here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    compression = args.compression if args.compression == "auto" else int(args.compression)

    start = time.time()
    train, held_out = generate_splits(
        args.num_train, args.num_eval, seed=args.seed, families=args.families.split(",")
    )
    model, processor = build_model("tiny", seed=args.seed)
    train, held_out = encode(train, processor), encode(held_out, processor)
    print(f"data ready in {time.time() - start:.0f}s: {len(train)} train, {len(held_out)} eval", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, int(0.05 * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
        ),
    )
    rng = np.random.default_rng(args.seed)
    curve = []
    model.train()
    tick = time.time()
    for step in range(1, args.steps + 1):
        out = model(**collate([train[i] for i in rng.integers(0, len(train), args.batch_size)], processor),
                    compression=compression)  # fmt: skip
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 25 == 0:
            routing = float(out.routing_loss) if out.routing_loss is not None else 0.0
            print(f"step {step} lm_loss {float(out.lm_loss):.3f} routing_loss {routing:.3f} "
                  f"{(time.time() - tick) / step:.2f} s/step", flush=True)  # fmt: skip
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, **evaluate(model, held_out, processor, compression)})
            print("EVAL " + json.dumps(curve[-1]), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "curve": curve}, indent=1)
        )


if __name__ == "__main__":
    main()
