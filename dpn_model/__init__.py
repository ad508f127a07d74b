"""The Dynamic Pyramid Network (arXiv 2503.20322) as a Hugging Face model. No Ray, no MLflow here.

Importing this package registers `dpn_llava` with transformers' Auto classes, so
`AutoConfig.from_pretrained`, `AutoModel.from_pretrained` and `AutoModelForImageTextToText.from_pretrained`
load DPN checkpoints.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from dpn_model.cache import DPNCache
from dpn_model.configuration import DPNConfig
from dpn_model.modeling import DPNCausalLMOutputWithPast, DPNForConditionalGeneration, DPNModel, routing_loss

AutoConfig.register(DPNConfig.model_type, DPNConfig, exist_ok=True)
AutoModel.register(DPNConfig, DPNModel, exist_ok=True)
AutoModelForImageTextToText.register(DPNConfig, DPNForConditionalGeneration, exist_ok=True)

__all__ = [
    "DPNCache",
    "DPNCausalLMOutputWithPast",
    "DPNConfig",
    "DPNForConditionalGeneration",
    "DPNModel",
    "routing_loss",
]
