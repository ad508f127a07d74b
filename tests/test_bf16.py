"""bf16 on CPU: the model's forward and `generate`, serving with `dtype: bfloat16`, DeepSpeed bf16 training.

torch runs bf16 on CPU, so the numerics of the GPU production path (bf16 weights and activations) are checked here
against fp32 on the tiny preset, with the checkpoint loaded the way the serving deployment loads it.

Tolerance. bf16 keeps 8 significant bits: `EPS = torch.finfo(torch.bfloat16).eps = 2**-7`. Loading in bf16 rounds
every weight and every matmul rounds its output again, so logits are compared relative to their own scale: at
every compared position, `max_v |logit_bf16 - logit_fp32| <= LOGIT_TOL * max_v |logit_fp32|`, `LOGIT_TOL = 4 * EPS`
(3.1%): a few roundings of the largest logit. Measured (compression 1, 2, 4, auto): at most 1.5% (~2 EPS) on the
random tiny model, 0.8-0.9% on average; at most 1.7% at the decoding steps of the confident model below.

Greedy tokens. A random model's logits are nearly flat (std ~0.2 over ~550 tokens), so its top-2 gaps are often
below bf16's error: greedy decoding of the plain random tiny model in bf16 does leave fp32's tokens at such
near-ties (3 of 4 modes within 8 tokens, at gaps ~1e-3). Agreement is only meaningful where fp32's decision has a
margin, as a trained model's has. So the greedy tests use a *confident* variant: the same random weights, with a
least-squares readout of fixed answers (from the fp32 hidden states of the test prompts, in every mode) added to
the lm head. They check that every greedy decision had an fp32 margin above twice the logit tolerance (bf16 cannot
flip it; measured: at least 42% of the logit scale, 36x the actual bf16 deviation) and that bf16 gives exactly
fp32's tokens, the fitted answers, through `generate` and through the serving stack.

Routers. Expert choices must agree. On random weights the router's probabilities are nearly uniform (temperature
10): the smallest top-2 gap is 3.5e-5 and bf16 moves the probabilities by up to 6.5e-6. Scaling the router's
weights would not help (its error scales alike). The forward test asserts equal choices and a gap above twice the
measured deviation, so the agreement is not a coin flip.

Training. DeepSpeed 0.19's CPU accelerator supports bf16: ZeRO-2 over gloo keeps bf16 weights and fp32 master
partitions, and two steps through the training loop's own engine setup run (marked slow: DeepSpeed's import and
its CPU shared-memory op, compiled once per machine on first use, dominate).
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from serve_cluster import free_port

EPS = torch.finfo(torch.bfloat16).eps  # 2**-7
LOGIT_TOL = 4 * EPS  # max |logit error| per position, relative to that position's largest |fp32 logit|
PROB_TOL = 4 * EPS  # router probabilities, absolute (they are in [0, 1])
READOUT_RIDGE = 1e-2  # ridge of the confident model's readout, relative to the mean squared hidden norm
READOUT_GAIN = 10.0  # the fitted answer's logit: this many base-logit standard deviations above the rest
MODES: list[str | int] = [1, 2, 4, "auto"]
QUESTIONS = [
    "What colour is the big shape?",
    "How many small shapes are in the picture?",
    "Which side is the large shape on?",
    "Is there a dot in the corner?",
]
ANSWER_LEN = 6  # answer tokens before end-of-sequence
MAX_PROMPT_TOKENS = 4096


def png_bytes(seed: int, side: int = 48) -> bytes:
    """A random RGB PNG."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def request(i: int, compression: str | int) -> dict[str, Any]:
    """The serving request of test prompt `i` (already validated shape, as the ingress passes it on)."""
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": QUESTIONS[i]}]}
        ],
        "images": [png_bytes(seed=i)],
        "max_tokens": ANSWER_LEN + 2,
        "temperature": 0.0,
        "compression": compression,
        "request_id": f"bf16-{i}-{compression}",
    }


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, as the serving batch builds them."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def lm_head_inputs(model: torch.nn.Module, **inputs: Any) -> torch.Tensor:
    """The final hidden states the lm head reads, `(batch, out_len, hidden)`, from one forward pass."""
    seen: list[torch.Tensor] = []
    handle = model.lm_head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, Any]:
    """The random tiny model and its confident variant (see the module docstring) as checkpoints, and the test
    batch: the serving requests' prompts, left-padded, with the fitted answers."""
    from dpn_model.presets import build_model
    from serve_apps.generation import prepare

    root = tmp_path_factory.mktemp("bf16")
    model, processor = build_model("tiny", seed=0)
    model.eval()
    model.save_pretrained(root / "random")
    processor.save_pretrained(root / "random")
    tokenizer = processor.tokenizer
    prepared = [prepare(processor, request(i, 1), MAX_PROMPT_TOKENS) for i in range(len(QUESTIONS))]
    ids, mask = left_pad([p.input_ids for p in prepared], tokenizer.pad_token_id)
    pixel_values = torch.cat([p.pixel_values for p in prepared])

    # distinct ordinary tokens per answer (a repeated token would make two decisions from near-equal states)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ordinary = torch.tensor([t for t in range(len(tokenizer)) if t not in special])
    generator = torch.Generator().manual_seed(0)
    answers = torch.stack(
        [ordinary[torch.randperm(len(ordinary), generator=generator)[:ANSWER_LEN]] for _ in prepared]
    )
    answers = torch.cat([answers, torch.full((len(prepared), 1), tokenizer.eos_token_id)], dim=1)

    # least-squares readout: the hidden state before each answer token -> that token, in every mode
    forced_ids = torch.cat([ids, answers[:, :-1]], dim=1)
    forced_mask = torch.cat([mask, torch.ones_like(answers[:, :-1])], dim=1)
    states = []
    with torch.no_grad():
        for mode in MODES:
            hidden = lm_head_inputs(
                model,
                input_ids=forced_ids,
                attention_mask=forced_mask,
                pixel_values=pixel_values,
                compression=mode,
            )
            states.append(hidden[:, -answers.shape[1] :].reshape(-1, hidden.shape[-1]))
        h = torch.cat(states)
        onehot = torch.nn.functional.one_hot(answers.reshape(-1), model.lm_head.weight.shape[0])
        onehot = onehot.to(h.dtype).repeat(len(MODES), 1)
        ridge = READOUT_RIDGE * (h * h).sum(-1).mean() * torch.eye(h.shape[0])
        readout = (h.T @ torch.linalg.solve(h @ h.T + ridge, onehot)).T  # (vocab, hidden)
        scale = (h @ model.lm_head.weight.T).std()
        model.lm_head.weight += READOUT_GAIN * scale * readout
    model.save_pretrained(root / "confident")
    processor.save_pretrained(root / "confident")
    return {
        "random": str(root / "random"),
        "confident": str(root / "confident"),
        "ids": ids,
        "mask": mask,
        "pixel_values": pixel_values,
        "answers": answers,
        "tokenizer": tokenizer,
    }


@pytest.fixture(scope="module")
def models(fitted) -> dict[tuple[str, torch.dtype], Any]:
    """Both checkpoints loaded as the deployment loads them (`serve_apps.loading.load_model`), in fp32 and bf16."""
    from serve_apps.loading import load_model

    loaded = {}
    for variant in ("random", "confident"):
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model, _ = load_model(fitted[variant], device="cpu", dtype=name)
            assert model.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
            loaded[variant, dtype] = model
    return loaded


def _inputs(fitted: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "input_ids": fitted["ids"],
        "attention_mask": fitted["mask"],
        "pixel_values": fitted["pixel_values"].to(dtype),
    }


# ---------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("compression", MODES)
def test_bf16_forward_matches_fp32(models, fitted, compression):
    """The random tiny model: logits within LOGIT_TOL of fp32's, the same pyramid (experts, token counts)."""
    with torch.inference_mode():
        ref = models["random", torch.float32](
            **_inputs(fitted, torch.float32), compression=compression, use_cache=False
        )
        out = models["random", torch.bfloat16](
            **_inputs(fitted, torch.bfloat16), compression=compression, use_cache=False
        )
    assert out.logits.dtype == torch.bfloat16
    assert torch.equal(out.expert_choices, ref.expert_choices)
    assert torch.equal(out.visual_tokens, ref.visual_tokens)
    assert torch.equal(out.layer_seq_lens, ref.layer_seq_lens)
    assert torch.equal(out.token_positions, ref.token_positions)
    if compression == "auto":
        assert (ref.expert_choices >= 0).any()
        deviation = (out.router_probs - ref.router_probs).abs().max()
        assert deviation <= PROB_TOL
        top2 = ref.router_probs.topk(2, dim=-1).values
        gap = (top2[..., 0] - top2[..., 1]).min()
        assert gap > 2 * deviation, f"router top-2 gap {gap:.2e} vs bf16 deviation {deviation:.2e}"
    real = out.token_positions >= 0  # text positions (pooled visual tokens have no input position)
    a, b = ref.logits[real].float(), out.logits[real].float()
    assert torch.isfinite(b).all()
    error = (b - a).abs().amax(-1) / a.abs().amax(-1)
    assert error.max() <= LOGIT_TOL, f"max relative logit error {error.max():.4f} (mean {error.mean():.4f})"
    assert (b.argmax(-1) == a.argmax(-1)).float().mean() > 0.9  # flips only at near-ties


# ---------------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("compression", MODES)
def test_bf16_generate_gives_fp32_greedy_tokens(models, fitted, compression):
    """The confident model: `generate` in bf16 gives fp32's greedy tokens, and no decision was a near-tie."""
    n_new = fitted["answers"].shape[1]
    runs = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            runs[dtype] = models["confident", dtype].generate(
                **_inputs(fitted, dtype),
                compression=compression,
                max_new_tokens=n_new,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
    ref, out = runs[torch.float32], runs[torch.bfloat16]
    width = fitted["ids"].shape[1]
    assert torch.equal(ref.sequences[:, width:], fitted["answers"])  # the fitted answers, in every mode
    assert torch.equal(out.sequences, ref.sequences)
    # same prefixes at every step, so the step scores compare like the forward's logits
    a, b = (
        torch.stack(ref.scores, dim=1).float(),
        torch.stack(out.scores, dim=1).float(),
    )  # (batch, steps, vocab)
    scale = a.abs().amax(-1)
    error = (b - a).abs().amax(-1) / scale
    assert error.max() <= LOGIT_TOL, f"max relative logit error {error.max():.4f}"
    top2 = a.topk(2, dim=-1).values
    assert ((top2[..., 0] - top2[..., 1]) > 2 * LOGIT_TOL * scale).all()  # a margin bf16 cannot overturn


# ---------------------------------------------------------------------------------------------------- serving


def _serve(path: str, dtype: str, compressions: list[str | int]) -> tuple[dict[str, Any], list[list[Any]]]:
    """Every test prompt at every rate through one replica (`DPNServer` without Ray Serve): its info and
    each request's events."""
    from serve_apps.model import DPNServer
    from serve_apps.policy import BatchingConfig

    server = DPNServer(
        batching=BatchingConfig(max_num_seqs=8, batch_wait_timeout_s=0.05),
        device="cpu",
        dtype=dtype,
        model=path,
    )

    async def one(req: dict[str, Any]) -> list[Any]:
        return [event async for event in server.generate(req)]

    async def main() -> list[list[Any]]:
        reqs = [request(i, c) for c in compressions for i in range(len(QUESTIONS))]
        return await asyncio.gather(*(one(r) for r in reqs))

    return server.info(), asyncio.run(main())


def test_serving_bf16_answers_as_fp32(fitted):
    from serve_apps.events import FinalEvent

    tokenizer = fitted["tokenizer"]
    expected = [tokenizer.decode(row[:-1].tolist(), skip_special_tokens=True) for row in fitted["answers"]]
    texts = {}
    for dtype in ("float32", "bfloat16"):
        info, results = _serve(fitted["confident"], dtype, MODES)
        assert info["dtype"] == dtype and info["device"] == "cpu"
        finals = []
        for events in results:
            assert isinstance(events[-1], FinalEvent), events[-1]
            finals.append(events[-1])
        for final in finals:  # every batch held one rate
            assert set(final.batch["requested"]) == {final.usage["compression_requested"]}
        texts[dtype] = [f.full_text for f in finals]
        # each answer ended at its end-of-sequence token, not at max_tokens
        assert all(f.finish_reason == "stop" for f in finals)
        assert texts[dtype] == expected * len(MODES)
    assert texts["bfloat16"] == texts["float32"]


# ---------------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_deepspeed_bf16_zero2_trains_on_cpu(fitted, monkeypatch):
    """DeepSpeed 0.19's CPU accelerator runs bf16 with ZeRO-2 over gloo: two optimizer steps through the training
    loop's own engine setup (`jobs.training.loop.setup_engine`, `deepspeed_config`, configs/deepspeed/zero2.json)."""
    import deepspeed
    import torch.distributed as dist

    from jobs.training.driver import DEEPSPEED_CONFIG_DIR
    from jobs.training.loop import apply_freezing, deepspeed_config, load_train_model, setup_engine

    port = free_port()
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    model = load_train_model(fitted["random"])  # the plain random tiny model, fp32 as the loop loads it
    apply_freezing(model, freeze_vision_tower=False, freeze_projector=False, freeze_language_model=False)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    inputs = _inputs(fitted, torch.float32)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        fp32_loss = float(model(**inputs, labels=labels, compression=2).loss)

    ds_config = deepspeed_config(
        json.loads((DEEPSPEED_CONFIG_DIR / "zero2.json").read_text()),
        micro_batch_size=4,
        grad_accum_steps=1,
        world_size=1,
        precision="bf16",
        grad_clip=1.0,
    )
    optim = {
        "lr": 1e-3,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "warmup_ratio": 0.0,
        "min_lr_ratio": 1.0,
    }
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        engine = setup_engine(model, ds_config, optim, total_steps=2, dist_backend="gloo")
        assert engine.bfloat16_enabled() and engine.zero_optimization_stage() == 2
        assert engine.device == torch.device("cpu")
        assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
        masters = engine.optimizer.single_partition_of_fp32_groups  # ZeRO-2's fp32 master weights
        assert all(m.dtype == torch.float32 for m in masters)
        before = [m.detach().clone() for m in masters]
        batch = dict(inputs, pixel_values=inputs["pixel_values"].to(torch.bfloat16))  # as the loop casts them
        losses = []
        for _ in range(2):
            out = engine(**batch, labels=labels, compression=2)
            engine.backward(out.loss)
            assert engine.is_gradient_accumulation_boundary()
            engine.step()
            losses.append(float(out.loss.detach()))
        assert engine.global_steps == 2
        assert all(np.isfinite(losses))
        assert abs(losses[0] - fp32_loss) <= 0.02 * fp32_loss, (losses, fp32_loss)  # bf16 forward ~ fp32's
        assert losses[1] < losses[0]  # the same batch again, after one AdamW step
        # the fp32 masters moved, except the routers': forced compression runs no router, so no gradient
        for group, old, new in zip(engine.optimizer.optimizer.param_groups, before, masters):
            assert torch.equal(old, new) == group["router"]
    finally:  # leave no process group behind for later tests in this process
        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
        elif dist.is_initialized():
            dist.destroy_process_group()


def test_cpu_training_config_takes_bf16_and_auto_stays_fp32():
    """`deepspeed.precision=bf16` with `run.use_gpu=false` builds a bf16 DeepSpeed config over gloo (the GPU recipe's
    precision, checkable on CPU); `auto` is fp32 on CPU; fp16 stays GPU-only."""
    from jobs.config import ConfigError, load_config
    from jobs.training.config import TrainConfig
    from jobs.training.driver import build_loop_spec
    from jobs.training.loop import WorkerSpec

    def spec(precision: str) -> WorkerSpec:
        data = {"deepspeed": {"precision": precision}, "run": {"use_gpu": False}}
        return build_loop_spec(load_config(TrainConfig, data=data), "model", 2, "", "")

    bf16 = spec("bf16")
    assert bf16.dist_backend == "gloo"
    assert bf16.ds_config["bf16"]["enabled"] and not bf16.ds_config["fp16"]["enabled"]
    assert bf16.ds_config["zero_optimization"]["stage"] == 2
    assert WorkerSpec.from_config(bf16.to_config()) == bf16  # what Ray hands the workers rebuilds it
    auto = spec("auto").ds_config
    assert not auto["bf16"]["enabled"] and not auto["fp16"]["enabled"]
    with pytest.raises(ConfigError, match="fp16 needs GPUs"):
        spec("fp16")
