"""The student as an MLflow pyfunc model (logged "from code": MLflow stores this file with the model).

It loads the student folder (an artifact of the model) with `trust_remote_code=True`, so it needs none of
this project's packages: only torch, transformers, peft, pillow and pandas. Input: a DataFrame with a binary
`image` column (encoded PNG/JPEG bytes) and an optional string `prompt` (a caption prefix); output: one
`caption` per row. Params: `max_new_tokens`, `num_beams`, `do_sample`, `mtp_speculative`.
"""

import io

import mlflow
import pandas as pd
import torch
from PIL import Image

PARAMS = {"max_new_tokens": 32, "num_beams": 1, "do_sample": False, "mtp_speculative": False}


class StudentCaptioner(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from transformers import AutoModelForCausalLM, AutoProcessor
        folder = context.artifacts["student"]
        self.model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = {**PARAMS, **(params or {})}
        captions = []
        for _, row in model_input.iterrows():
            image = Image.open(io.BytesIO(row["image"]))
            prompt = row.get("prompt") if isinstance(row.get("prompt"), str) and row.get("prompt") else None
            inputs = self.processor(images=image, text=prompt)
            with torch.no_grad():
                tokens = self.model.generate(**inputs, max_new_tokens=int(params["max_new_tokens"]),
                                             num_beams=int(params["num_beams"]), do_sample=bool(params["do_sample"]),
                                             mtp_speculative=bool(params["mtp_speculative"]))
            captions.append(self.processor.batch_decode(tokens[:, 1:], skip_special_tokens=True)[0])
        return pd.DataFrame({"caption": captions})


mlflow.models.set_model(StudentCaptioner())
