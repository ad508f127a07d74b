"""Shared test setup: never reach a model hub; keep CPU thread counts small on 2-core machines."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster per test module that asks for it (2 logical CPUs), shut down after the module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A small random fp32 DPN checkpoint (`small_config.make_config()`, seed 0), as presets and `dpn convert` save
    them: no processor, for the tests that load weights only."""
    import torch
    from small_config import make_config

    from dpn_model import DPNForConditionalGeneration

    out = tmp_path_factory.mktemp("small-checkpoint")
    torch.manual_seed(0)
    DPNForConditionalGeneration(make_config()).save_pretrained(out)
    return out
