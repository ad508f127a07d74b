"""The Dynamic Pyramid Network (arXiv 2503.20322) as a Hugging Face model. No Ray, no MLflow here.

Importing this package registers `dpn_llava` with transformers' Auto classes, so
`AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`, `AutoProcessor` and `AutoImageProcessor`
`.from_pretrained(directory)` load DPN checkpoints.
"""

from transformers import AutoModel, AutoModelForImageTextToText

from dpn_model.cache import DPNCache
from dpn_model.configuration import CompressionSpec, DPNConfig
from dpn_model.image_processing import DPNImageProcessor, decode_image
from dpn_model.loading import load_model_and_processor
from dpn_model.losses import routing_loss
from dpn_model.modeling import DPNCausalLMOutputWithPast, DPNForConditionalGeneration, DPNModel
from dpn_model.processing import IGNORE_INDEX, DPNProcessor, PromptTooLongError, build_prompt, register
from dpn_model.tokenization import add_dpn_special_tokens, build_tokenizer

register()  # AutoConfig, AutoImageProcessor, AutoProcessor
AutoModel.register(DPNConfig, DPNModel, exist_ok=True)
AutoModelForImageTextToText.register(DPNConfig, DPNForConditionalGeneration, exist_ok=True)

__all__ = [
    "IGNORE_INDEX",
    "CompressionSpec",
    "DPNCache",
    "DPNCausalLMOutputWithPast",
    "DPNConfig",
    "DPNForConditionalGeneration",
    "DPNImageProcessor",
    "DPNModel",
    "DPNProcessor",
    "PromptTooLongError",
    "add_dpn_special_tokens",
    "build_prompt",
    "build_tokenizer",
    "decode_image",
    "load_model_and_processor",
    "routing_loss",
]
