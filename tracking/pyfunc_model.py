"""The MLflow pyfunc flavour of a DPN model: a thin wrapper around its Hugging Face checkpoint.

Logged as code (MLflow's "models from code", :func:`tracking.models.log_hf_model` passes this file's path), so
no pickle of a Python object is stored or loaded: the file runs on load and :func:`mlflow.models.set_model`
names the model. It therefore imports nothing from ``tracking`` (only ``dpn_model`` travels with the model).
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc

# = tracking.models.HF_ARTIFACT (dpn_base.model_ref.HF_MODEL_DIR); this file imports neither (only dpn_model
# travels with the logged model, see above)
HF_ARTIFACT = "hf_model"


class DPNPyfuncModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper around the Hugging Face checkpoint in ``artifacts["hf_model"]``.

    ``predict`` takes rows with ``prompt`` (a user message) and optional ``image`` (PNG/JPEG bytes or
    base64 string) and returns the generated answers; serving uses the checkpoint directly
    (:func:`tracking.models.resolve_model_dir`), this is for ``mlflow.pyfunc.load_model`` users.
    """

    def load_context(self, context: Any) -> None:
        from dpn_model import load_model_and_processor

        self.model, self.processor = load_model_and_processor(context.artifacts[HF_ARTIFACT])

    # no type hints here: MLflow would turn them into a (wrong) input schema
    def predict(self, context, model_input, params=None):
        import base64

        import torch

        from dpn_model.image_processing import decode_image

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        params = params or {}
        answers = []
        for row in rows:
            image = row.get("image")
            if isinstance(image, str):
                image = base64.b64decode(image)
            images = [decode_image(image)] if image else None
            content = [{"type": "image"}] if images else []  # the image before the text, as a chat request
            content.append({"type": "text", "text": str(row["prompt"])})
            inputs = self.processor.generation_inputs([{"role": "user", "content": content}], images)
            with torch.no_grad():
                out = self.model.generate(
                    **inputs,
                    max_new_tokens=int(params.get("max_new_tokens", 32)),
                    do_sample=False,
                    compression=params.get("compression", "auto"),
                )
            new = out[0, inputs["input_ids"].shape[1] :]
            answers.append(self.processor.tokenizer.decode(new, skip_special_tokens=True).strip())
        return answers


mlflow.models.set_model(DPNPyfuncModel())

__all__ = ["DPNPyfuncModel", "HF_ARTIFACT"]
