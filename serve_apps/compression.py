"""The `compression` of a serving request: its forms, its check against the model and the rate it runs at: the one
owner of the rules from a compression to a `Rate`. (The rate a batch runs at is its queue's, serve_apps.policy's
`RateQueues.group_rate`; the one-queue baseline's densest rate is benchmarks/serve_load.py's.)

Serving accepts what `dpn_model.configuration.CompressionSpec.parse` (the one parser of a compression) accepts, but
random routing:

- `"auto"`: the router decides, per request (the default);
- `"auto:lambda=X"`: the router with the cost dial (`dpn_model.configuration.CompressionSpec`): one trained model
  trades accuracy for FLOPs per request, without retraining; `X > 0` pools harder, `X < 0` keeps more;
- a factor, `2` or `"2"`: that expert at every pooling layer (1 = dense);
- a schedule, `[1, 2, 4]`, `"1,2,4"` or `"1-2-4"`: one factor per pooling layer, a static pyramid.

`"random"` (an expert drawn uniformly per sample and layer) is the paper's training ablation; serving refuses it:
it draws from the compute thread's global generator, so neither `seed` nor `temperature: 0` could reproduce an
answer, and no client gains from it.

It is checked twice, each time as a 400 naming `compression`: for form at the ingress ([`check_form`]: ASCII
text, integers and not booleans, at most `MAX_SCHEDULE_LENGTH` factors), and against the model on the replica,
which knows its config ([`for_model`]: factors its experts have, one per pooling layer). The `Rate` `for_model`
returns is the request's from then on: it travels in the prepared request (serve_apps.generation) as it is.

What queues, batch records and usage carry is the [`Rate`]: `"auto"`, `"auto:lambda=X"` (its canonical spelling,
so equal dials share a queue), an `int` for a factor, or the schedule's `compression_label` (`"1-2-4"`). A uniform schedule (`[2, 2, 2]`) is its factor (`2`): the same computation, so it
shares that queue. The model takes a `Rate` as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dpn_model.configuration import DEFAULT_COMPRESSION_FACTORS, ROUTING_MODES, CompressionSpec

Rate = str | int
"""A compression as serving runs it: `"auto"`, `"auto:lambda=X"`, a factor, or a schedule's label (`"1-2-4"`)."""

REFUSED_MODES = ("random",)
"""The model's routing modes serving refuses (see above)."""
SERVED_MODES = tuple(mode for mode in ROUTING_MODES if mode not in REFUSED_MODES)
"""The model's routing modes (`dpn_model.configuration.ROUTING_MODES`) a request may ask for: `("auto",)`."""

MAX_SCHEDULE_LENGTH = 64  # far more pooling layers than any model has (LLaVA-1.5-7B: 3)
# the default experts' factors; a model's own are checked on its replica (for_model)
_FACTORS = ", ".join(str(f) for f in DEFAULT_COMPRESSION_FACTORS)
FORMS = (
    f"{' or '.join(repr(mode) for mode in SERVED_MODES)}, 'auto:lambda=X' (the cost dial), a factor ({_FACTORS}; 1 = dense) or one factor per pooling layer "
    f"([{_FACTORS}] or '{_FACTORS.replace(' ', '')}')"
)


def _check_text(value: Any) -> None:
    """ASCII only (`"²"` and `"١"` pass `str.isdigit()`; the second even converts), and not random routing."""
    items = value if isinstance(value, list | tuple) else [value]
    for item in items:
        if isinstance(item, str) and not item.isascii():
            raise ValueError(f"compression {value!r} is not understood: give {FORMS} in ASCII digits")
    if isinstance(value, str) and value.strip().lower() in REFUSED_MODES:
        raise ValueError(
            "compression 'random' (random routing) is a training ablation and is not served: its expert draws "
            f"would make answers irreproducible; give {FORMS}"
        )


def _canonical(spec: CompressionSpec) -> Rate:
    """The `Rate` of a parsed compression: its label, but a factor (or a uniform schedule) as an `int`."""
    if isinstance(spec.factors, tuple) and len(set(spec.factors)) == 1:
        return spec.factors[0]  # a uniform schedule is its factor: the same computation, the same queue
    return spec.factors if isinstance(spec.factors, int) else spec.label


def check_form(value: Any) -> str | int | list[int]:
    """A request's `compression`, checked for form only (no model config at the ingress).

    Returns:
        `"auto"`, a factor, or a schedule as a list of factors.

    Raises:
        `ValueError`: a boolean, a non-integer, non-ASCII text, `"random"`, an empty or over-long schedule.
    """
    raw = _checked(value).raw
    return list(raw) if isinstance(raw, tuple) else raw


def _checked(value: Any) -> CompressionSpec:
    """A request's `compression`, checked for form as [`check_form`] says, parsed."""
    if isinstance(value, str) and len(value) > 4 * MAX_SCHEDULE_LENGTH:
        raise ValueError(f"compression is {len(value)} characters long; give {FORMS}")
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) > MAX_SCHEDULE_LENGTH:
        raise ValueError(
            f"compression schedule has {len(value)} factors; at most {MAX_SCHEDULE_LENGTH}, one per pooling layer"
        )
    if isinstance(value, list | tuple) and not value:
        raise ValueError(f"compression schedule is empty; give {FORMS}")
    _check_text(value)
    try:
        spec = CompressionSpec.parse(value)
    except ValueError as exc:  # its list of forms names 'random', which serving refuses: give serving's
        raise ValueError(f"{str(exc).split('; ')[0]}; give {FORMS}") from None
    if isinstance(spec.factors, tuple) and len(spec.factors) > MAX_SCHEDULE_LENGTH:
        raise ValueError(
            f"compression schedule has {len(spec.factors)} factors; at most {MAX_SCHEDULE_LENGTH}, one per pooling "
            "layer"
        )
    return spec


def allowed(config: Any) -> str:
    """The compressions `config`'s model serves, in words, for error messages."""
    factors = sorted(set(config.compression_factors))
    layers = len(config.pooling_layers)
    example = [factors[min(i, len(factors) - 1)] for i in range(layers)]
    return (
        f"This model serves compression 'auto' (or 'auto:lambda=X', the cost dial), one of the factors {factors}, "
        f"or a schedule of {layers} "
        f"factor(s) from {factors}, one per pooling layer (e.g. {example} or {','.join(map(str, example))!r})"
    )


def for_model(value: Any, config: Any) -> Rate:
    """The `Rate` a request's `compression` runs at on the model of `config` (`expert_strides`, `pooling_layers`).

    Raises:
        `ValueError`: a form serving refuses (see [`check_form`]), a factor no expert of the model has, or a
            schedule whose length is not the number of pooling layers; the message lists what the model serves.
    """
    spec = _checked(value)
    try:
        spec.check(config, value)
    except ValueError as exc:
        raise ValueError(f"{exc}. {allowed(config)}") from None
    return _canonical(spec)


def as_rate(value: Any) -> Rate:
    """`value` (checked for form) as a `Rate`, without a model config: for code that has no model at hand (the
    benchmarks' baselines); a replica uses [`for_model`]."""
    return _canonical(_checked(value))


def _forced(rate: Rate) -> CompressionSpec:
    """A forced `rate` parsed (a routed one has no factors per layer)."""
    spec = CompressionSpec.parse(rate)
    if spec.factors is None:
        raise ValueError(
            f"rate {rate!r} is routed: it has no factors per layer (give a factor or a schedule)"
        )
    return spec


def factors_per_layer(rate: Rate, layers: int) -> tuple[int, ...]:
    """The factor of each of `layers` pooling layers under a forced `rate` (a factor or a schedule's label; a
    schedule gives its own factors, whatever `layers` is)."""
    return _forced(rate).factors_per_layer(layers)


__all__ = [
    "FORMS",
    "MAX_SCHEDULE_LENGTH",
    "REFUSED_MODES",
    "SERVED_MODES",
    "Rate",
    "allowed",
    "as_rate",
    "check_form",
    "factors_per_layer",
    "for_model",
]
