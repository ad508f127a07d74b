"""The Dynamic Pyramid Network (arXiv 2503.20322) as a Hugging Face model. No Ray, no MLflow here."""

from dpn_model.configuration import DPNConfig

__all__ = ["DPNConfig"]
