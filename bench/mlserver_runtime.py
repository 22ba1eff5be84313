"""MLServer custom runtime serving one ONNX file with ONNX Runtime: the MLServer baseline.

Runs inside the separate MLServer virtualenv (.bench/mlserver-venv), never the project's.
model-settings.json names it as `mlserver_runtime.OnnxModel`; `parameters.uri` is the ONNX
file and `parameters.extra.intra_op_threads` the ONNX Runtime thread count (default 2).
`predict` runs the session on the event loop, as MLServer's own runtimes (sklearn, xgboost) do.
"""
from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    """One ONNX Runtime CPU session; every request input is fed by name, every output returned."""

    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        extra = (self._settings.parameters.extra if self._settings.parameters else None) or {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("intra_op_threads", 2))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: self.decode(i, default_codec=NumpyCodec) for i in payload.inputs}
        results = self._session.run(self._output_names, feeds)
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=[NumpyCodec.encode_output(name, value)
                     for name, value in zip(self._output_names, results)],
        )
