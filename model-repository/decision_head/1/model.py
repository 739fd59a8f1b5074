"""Triton python backend: the Streaming-Train decision head (ONNX, run with onnxruntime).

Written by ``streamharness train export`` (``model.onnx`` and ``head.json`` beside this file, the
threshold and window in ``../config.pbtxt``). Needs numpy < 2 and onnxruntime in the python
backend's environment, nothing from the ``streamharness`` package. Several requests that the
dynamic batcher hands over together run as one onnxruntime batch.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

INPUTS = (("FRAMES", "frames"), ("TEXT", "text"), ("TIME", "time"))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        onnx_path = Path(args["model_repository"]) / str(args["model_version"]) / params.get("onnx_file", "model.onnx")
        if not onnx_path.is_file():
            raise pb_utils.TritonModelException(
                "{} is missing: train and export a head with `streamharness train train --trainer head` and "
                "`streamharness train export` (docs/training.md)".format(onnx_path))
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1") or 1)
        self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = [None] * len(requests)
        parts, owners = {name: [] for name, _ in INPUTS}, []
        for i, request in enumerate(requests):
            arrays = [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name, _ in INPUTS]
            if len({a.shape[0] for a in arrays}) != 1:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    "FRAMES, TEXT and TIME must have the same number of rows, got {}".format([a.shape[0] for a in arrays])))
                continue
            for (name, _), a in zip(INPUTS, arrays):
                parts[name].append(a.astype(np.float32, copy=False))
            owners.append((i, arrays[0].shape[0]))
        if not owners:
            return responses
        feed = {onnx_name: np.concatenate(parts[name]) for name, onnx_name in INPUTS}
        try:
            probability, logit = self.session.run(["probability", "logit"], feed)
        except Exception as err:  # a failed forward fails the requests in it, not the model
            for i, _ in owners:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError("onnxruntime: {}".format(err)))
            return responses
        start = 0
        for i, rows in owners:
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("PROBABILITY", np.ascontiguousarray(probability[start:start + rows], dtype=np.float32)),
                pb_utils.Tensor("LOGIT", np.ascontiguousarray(logit[start:start + rows], dtype=np.float32)),
            ])
            start += rows
        return responses

    def finalize(self):
        self.session = None
