"""Can the router tell the questions apart? A linear probe on what each DPN router reads.

    python benchmarks/router_probe.py --model checkpoints/tiny-dense [--samples 1600] [--train-fraction 0.625]

Runs the model (``auto``, inference) on fresh synthetic eval questions, collects each pooling stage's router
input (the ``<router>`` tokens' hidden state, ``dpn_model.pooling.router_input``) with a forward pre-hook, and
fits a multinomial logistic regression on the first part to predict the question's kind (``coarse`` / ``fine``)
and family from it; prints the held-out accuracy per stage. A high accuracy means the information a
per-question routing needs reaches the router, so a router that routes every question alike fails to learn it
(an optimisation problem), not to see it. Later stages read hidden states that depend on the path taken so far.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def collect(
    model_dir: str, samples: int, batch_size: int
) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
    """Router inputs per stage `(samples, hidden)`, and the samples' kinds and families."""
    from dpn_model import DPNForConditionalGeneration
    from pipelines.preprocess import Preprocessor, collate_batch
    from pipelines.synthetic import data_rows, generate_samples

    model = DPNForConditionalGeneration.from_pretrained(model_dir).eval()
    pre = Preprocessor(model_dir, 2048, "eval")
    inputs_per_stage: list[list[torch.Tensor]] = [[] for _ in model.model.pyramid]
    for stage, store in zip(model.model.pyramid, inputs_per_stage):
        stage.router.register_forward_pre_hook(lambda _m, args, store=store: store.append(args[0].float()))
    data = list(generate_samples(samples, seed=11, tag="eval"))
    tokenizer = pre.processor.tokenizer
    for i in range(0, len(data), batch_size):
        batch = collate_batch(
            pre(data_rows(data[i : i + batch_size])),
            tokenizer.pad_token_id,
            "left",
            pre.processor.image_processor,
        )
        with torch.inference_mode():
            model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], compression="auto",
            )  # fmt: skip
    kinds = np.array([s.kind for s in data])
    families = np.array([s.family for s in data])
    return [torch.cat(x) for x in inputs_per_stage], kinds, families


def probe_accuracy(x: torch.Tensor, labels: np.ndarray, n_train: int, l2: float = 1e-3) -> float:
    """Held-out accuracy of an L2-regularised logistic regression fitted (L-BFGS) on the first `n_train` rows."""
    classes, y = np.unique(labels, return_inverse=True)
    y = torch.as_tensor(y)
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[n_train:] @ w + b).argmax(-1) == y[n_train:]).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local DPN checkpoint directory")
    parser.add_argument("--samples", type=int, default=1600)
    parser.add_argument("--train-fraction", type=float, default=0.625)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    per_stage, kinds, families = collect(args.model, args.samples, args.batch_size)
    n_train = int(args.samples * args.train_fraction)
    print(f"model {args.model}: {args.samples} questions, probe fitted on {n_train}, scored on the rest")
    print(f"{'stage':>5}  {'kind acc %':>10}  {'family acc %':>12}")
    for s, x in enumerate(per_stage):
        kind = 100 * probe_accuracy(x, kinds, n_train)
        family = 100 * probe_accuracy(x, families, n_train)
        print(f"{s:>5}  {kind:>10.1f}  {family:>12.1f}")
    print(f"chance: kind {100 / len(set(kinds)):.1f}%, family {100 / len(set(families)):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
