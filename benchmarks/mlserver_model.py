"""The minimal MLServer model class that serves an ONNX file with onnxruntime (for runtime.py).

It runs inside MLServer's own virtual environment (benchmarks/.venv/mlserver, made by
``benchmarks/runtime.py``), not in the project's: mlserver is not a dependency of edgepack.
``benchmarks/runtime.py`` copies this file next to the model-settings.json it writes and points
``implementation`` at ``mlserver_model.OnnxModel``. Session options are onnxruntime's defaults
but for ``parameters.extra.intra_op_threads``, which the benchmark sets as for the runtime.
"""

from __future__ import annotations

from typing import Any

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):  # type: ignore[misc]  # mlserver is not installed where mypy runs
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        extra = (self._settings.parameters.extra if self._settings.parameters else None) or {}
        options.intra_op_num_threads = int(extra.get("intra_op_threads", 0))
        self._session: Any = ort.InferenceSession(
            uri, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._outputs = [node.name for node in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {item.name: NumpyCodec.decode_input(item) for item in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, result)
                for name, result in zip(self._outputs, results, strict=True)
            ],
        )
