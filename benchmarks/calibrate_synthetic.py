"""Calibrate the synthetic benchmark: does pooling the visual tokens hurt fine but not coarse families?

Trains Hugging Face's own ``LlavaForConditionalGeneration`` (tiny random config, from scratch,
plain PyTorch AdamW, one process) on in-memory synthetic samples, once per pooling factor:
dense (1), 2x2 and 4x4 max pooling of the projected image features on the patch grid before they
enter the decoder. Reports held-out exact-match accuracy per question family.

    python benchmarks/calibrate_synthetic.py --steps 1200 --pools 1 2 4

Each run's results are stored in ``benchmarks/results/calibration.json`` (keyed by model shape,
steps and pool) and ``benchmarks/results/calibration.md`` is re-rendered from all stored runs, so
variants can run as separate processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.synthetic import ANSWERS, FAMILIES, FAMILY_KIND, QUESTIONS, SyntheticSample, generate_splits  # noqa: E402

log = logging.getLogger("calibrate")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SPECIALS = ("<pad>", "<s>", "<image>")
NOTES_MARKER = "<!-- notes: text below this line is kept when the table is re-rendered -->"


@dataclass(frozen=True)
class Shape:
    """Model shape of the tiny LLaVA."""

    image_size: int = 64
    patch_size: int = 4
    width: int = 128
    vision_layers: int = 3
    decoder_layers: int = 4
    heads: int = 4

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# ----------------------------------------------------------------------------- vocab and batches


def words(text: str) -> list[str]:
    """Word-level tokenisation: lower case, '?' and '.' as their own words."""
    return text.lower().replace("?", " ?").replace(".", " .").split()


def build_vocab() -> dict[str, int]:
    """Closed word vocabulary of every question and answer (self-contained, no tokenizer files)."""
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    texts = [q for qs in QUESTIONS.values() for q in qs] + [
        a for answers in ANSWERS.values() for a in answers
    ]
    for word in sorted({w for text in texts for w in words(text)}):
        vocab.setdefault(word, len(vocab))
    return vocab


@dataclass
class Encoded:
    """A split as tensors: pixels `(N, 3, H, W)` uint8, token ids `(N, T)`, answer position and id `(N,)`."""

    pixels: torch.Tensor
    input_ids: torch.Tensor
    answer_pos: torch.Tensor
    answer_id: torch.Tensor
    families: np.ndarray


def encode(samples: Sequence[SyntheticSample], vocab: dict[str, int], num_visual: int) -> Encoded:
    """Prompt ``<s> <image>*num_visual question-words answer``, right padded."""
    prompts = [
        [vocab["<s>"]] + [vocab["<image>"]] * num_visual + [vocab[w] for w in words(s.question)]
        for s in samples
    ]
    length = max(len(p) for p in prompts) + 1
    ids = torch.full((len(samples), length), vocab["<pad>"], dtype=torch.long)
    for row, (prompt, sample) in enumerate(zip(prompts, samples)):
        ids[row, : len(prompt) + 1] = torch.tensor(prompt + [vocab[sample.answer]])
    pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    answer_pos = torch.tensor([len(p) for p in prompts])
    answer_id = ids[torch.arange(len(samples)), answer_pos]
    return Encoded(pixels, ids, answer_pos, answer_id, np.array([s.family for s in samples]))


# ----------------------------------------------------------------------------- model


def build_model(
    shape: Shape, vocab_size: int, image_token_id: int, pad_id: int
) -> LlavaForConditionalGeneration:
    """A tiny random LLaVA; the vision tower's last layer feeds the projector."""
    vision = CLIPVisionConfig(
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        hidden_size=shape.width,
        intermediate_size=4 * shape.width,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.heads,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.width,
        intermediate_size=4 * shape.width,
        num_hidden_layers=shape.decoder_layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=512,
        pad_token_id=pad_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config)


def answer_logits(
    model: LlavaForConditionalGeneration,
    batch: Encoded,
    pool: int,
    grid: int,
    image_token_id: int,
    pad_id: int,
) -> torch.Tensor:
    """Logits `(B, V)` predicting the answer word, visual tokens max-pooled ``pool`` x ``pool``."""
    pixels = (batch.pixels.float() / 127.5) - 1.0
    features = model.model.get_image_features(
        pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
    )
    features = torch.stack(list(features.pooler_output))  # (B, grid*grid, D)
    b, _, d = features.shape
    if pool > 1:
        grid_features = features.transpose(1, 2).reshape(b, d, grid, grid)  # (B, D, g, g)
        features = F.max_pool2d(grid_features, pool).flatten(2).transpose(1, 2)  # (B, g*g/pool^2, D)
    embeds = model.get_input_embeddings()(batch.input_ids)
    image_mask = (batch.input_ids == image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, features.reshape(-1, d).to(embeds.dtype))
    attention_mask = (batch.input_ids != pad_id).long()
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits  # (B, T, V)
    return logits[torch.arange(b), batch.answer_pos - 1]


def take(data: Encoded, index: torch.Tensor) -> Encoded:
    return Encoded(
        data.pixels[index],
        data.input_ids[index],
        data.answer_pos[index],
        data.answer_id[index],
        data.families[index.numpy()],
    )


@torch.no_grad()
def evaluate(
    model, data: Encoded, pool: int, grid: int, image_token_id: int, pad_id: int
) -> dict[str, float]:
    """Exact-match accuracy per family (argmax over the whole vocabulary)."""
    model.eval()
    correct = []
    for start in range(0, len(data.answer_id), 64):
        batch = take(data, torch.arange(start, min(start + 64, len(data.answer_id))))
        correct.append(
            answer_logits(model, batch, pool, grid, image_token_id, pad_id).argmax(-1) == batch.answer_id
        )
    model.train()
    hits = torch.cat(correct).numpy()
    return {
        family: float(hits[data.families == family].mean())
        for family in FAMILIES
        if (data.families == family).any()
    }


def train_variant(
    args: argparse.Namespace, shape: Shape, pool: int, train_samples, eval_samples, on_eval=None
) -> dict:
    """Train one pooling variant from scratch and return its timings and accuracies."""
    vocab = build_vocab()
    num_visual = (shape.grid // pool) ** 2
    train, held_out = encode(train_samples, vocab, num_visual), encode(eval_samples, vocab, num_visual)
    image_id, pad_id = vocab["<image>"], vocab["<pad>"]
    model = build_model(shape, len(vocab), image_id, pad_id)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
        ),
    )
    generator = torch.Generator().manual_seed(args.seed)
    curve, train_time, loss_ema = [], 0.0, None
    for step in range(1, args.steps + 1):
        tick = time.perf_counter()
        batch = take(train, torch.randint(len(train.answer_id), (args.batch_size,), generator=generator))
        loss = F.cross_entropy(
            answer_logits(model, batch, pool, shape.grid, image_id, pad_id), batch.answer_id
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        train_time += time.perf_counter() - tick
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, held_out, pool, shape.grid, image_id, pad_id)
            curve.append({"step": step, "loss": round(loss_ema, 4), "acc": acc})
            if on_eval is not None:  # store partial results: a killed run still leaves its curve
                on_eval(_result(args, shape, pool, num_visual, params, train_time / step, curve))
            log.info(
                "pool=%d step=%d loss=%.3f s/step=%.2f acc=%s",
                pool,
                step,
                loss_ema,
                train_time / step,
                {k: round(v, 2) for k, v in acc.items()},
            )
    return _result(args, shape, pool, num_visual, params, train_time / args.steps, curve)


def _result(
    args, shape: Shape, pool: int, num_visual: int, params: int, seconds_per_step: float, curve: list
) -> dict:
    return {
        "shape": asdict(shape),
        "params": params,
        "pool": pool,
        "visual_tokens": num_visual,
        "steps": args.steps,
        "steps_done": curve[-1]["step"],
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seconds_per_step": round(seconds_per_step, 3),  # training only, eval excluded
        "final": curve[-1]["acc"],
        "curve": curve,
    }


# ----------------------------------------------------------------------------- report


def _key(run: dict) -> str:
    s = run["shape"]
    return (
        f"img{s['image_size']}-p{s['patch_size']}-w{s['width']}-v{s['vision_layers']}-d{s['decoder_layers']}"
        f"-steps{run['steps']}-bs{run['batch_size']}-pool{run['pool']}"
    )


def steps_cell(run: dict) -> str:
    done = run.get("steps_done", run["steps"])
    return str(done) if done == run["steps"] else f"{done} of {run['steps']} (stopped)"


def render_markdown(runs: dict[str, dict], command: str) -> str:
    """The calibration table: one row per stored run, accuracy per family at the last step."""
    chance = {f: 1 / len(ANSWERS[f]) for f in FAMILIES}
    header = (
        ["model", "params", "pool", "vis. tokens", "steps", "s/step"]
        + [f"{f} ({FAMILY_KIND[f]}, chance {chance[f]:.0%})" for f in FAMILIES]
        + ["coarse mean", "fine mean"]
    )
    lines = [
        "# Synthetic benchmark calibration",
        "",
        "Tiny `transformers.LlavaForConditionalGeneration` trained from scratch (AdamW, batch 32, one",
        "process, `torch.set_num_threads(1)`) on in-memory samples of `pipelines/synthetic.py`; the projected",
        "image features are max-pooled `pool x pool` on the patch grid before the decoder. Held-out",
        "exact-match accuracy per family at the last step (eval split, disjoint from train).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, no GPU; "
        f"torch {torch.__version__}.",
        "",
        "Re-run: `python benchmarks/calibrate_synthetic.py --steps N --pools 1 2 4 [--width ...]` (each run's",
        "exact command is listed with its learning curve below); `--report-only` re-renders this file.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for key in sorted(runs):
        run = runs[key]
        s, acc = run["shape"], run["final"]
        model = f"img{s['image_size']}/p{s['patch_size']} w{s['width']} vis{s['vision_layers']} dec{s['decoder_layers']}"
        coarse, fine = _kind_mean(acc, "coarse"), _kind_mean(acc, "fine")
        cells = [
            model,
            f"{run['params'] / 1e6:.2f}M",
            f"{run['pool']}x{run['pool']}" if run["pool"] > 1 else "dense",
            str(run["visual_tokens"]),
            steps_cell(run),
            f"{run['seconds_per_step']:.2f}",
        ]
        cells += [f"{acc[f]:.1%}" if f in acc else "-" for f in FAMILIES] + [f"{coarse:.1%}", f"{fine:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Learning curves, held-out accuracy `coarse mean / fine mean` at each evaluated step:", ""]
    for key in sorted(runs):
        points = [
            f"{p['step']}: {_kind_mean(p['acc'], 'coarse'):.0%} / {_kind_mean(p['acc'], 'fine'):.0%}"
            for p in runs[key]["curve"]
        ]
        lines.append(f"- `{key}` (`{runs[key].get('command', '')}`): " + ", ".join(points))
    lines.append("")
    return "\n".join(lines)


def _kind_mean(acc: dict[str, float], kind: str) -> float:
    return float(np.mean([acc[f] for f in FAMILIES if FAMILY_KIND[f] == kind and f in acc]))


def store(run: dict | None, command: str, results_dir: Path) -> None:
    """Add ``run`` (if any) to ``calibration.json`` and re-render ``calibration.md`` from all runs."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "calibration.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    if run is not None:
        runs[_key(run)] = {**run, "command": command}
    path.write_text(json.dumps(runs, indent=1) + "\n")
    md_path = results_dir / "calibration.md"
    notes = ""  # hand-written findings below the marker survive re-rendering
    if md_path.exists() and NOTES_MARKER in md_path.read_text():
        notes = md_path.read_text().split(NOTES_MARKER, 1)[1]
    md_path.write_text(render_markdown(runs, command) + "\n" + NOTES_MARKER + notes)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument(
        "--pools", type=int, nargs="+", default=[1, 2, 4], help="pooling factors to train (1 = dense)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-train", type=int, default=12000)
    parser.add_argument("--num-eval", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=3)
    parser.add_argument("--decoder-layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--report-only", action="store_true", help="only re-render calibration.md from the json"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    shape = Shape(
        args.image_size, args.patch_size, args.width, args.vision_layers, args.decoder_layers, args.heads
    )
    command = "python benchmarks/calibrate_synthetic.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        store(None, command, args.results_dir)
        return
    started = time.perf_counter()
    train_samples, eval_samples = generate_splits(args.num_train, args.num_eval, args.seed, args.image_size)
    log.info(
        "generated %d train + %d eval samples in %.1fs",
        len(train_samples),
        len(eval_samples),
        time.perf_counter() - started,
    )
    for pool in args.pools:
        run = train_variant(
            args,
            shape,
            pool,
            train_samples,
            eval_samples,
            on_eval=lambda r: store(r, command, args.results_dir),
        )
        log.info("pool=%d done: %s", pool, run["final"])


if __name__ == "__main__":
    main()
