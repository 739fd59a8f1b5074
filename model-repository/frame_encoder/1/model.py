"""Triton python backend: the frame encoder (EfficientNet-Lite0 as ONNX, run with onnxruntime).

Served by the tritonserver in the ``nvidia-pytriton`` wheel (dev and tests, see
``streamharness.devinfra.triton_server``) and by the official ``nvcr.io/nvidia/tritonserver`` image
(``images/triton/Dockerfile``). Needs numpy < 2 and onnxruntime (``onnxruntime-gpu`` on GPUs) in the
python backend's environment; nothing from the ``streamharness`` package, and Python >= 3.8.

Per request: IMAGE uint8 [n, 224, 224, 3] RGB. The dynamic batcher hands several requests to one
``execute`` call; they run as one onnxruntime batch and are split again per request.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

EMBEDDING_DIM = 1280
NUM_CLASSES = 1000


def _log(level, message):
    logger = getattr(pb_utils, "Logger", None)  # Triton >= 23.04
    if logger is not None:
        getattr(logger, "log_" + level)(message)
    else:
        print("[frame_encoder] " + message, flush=True)


def _error(message, invalid_argument=False):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid_argument else None
    if code is not None:
        try:
            return pb_utils.TritonError(message, code)
        except TypeError:  # Triton < 23.10 has no error codes in the python backend
            pass
    return pb_utils.TritonError(message)


def _parse_top_k(value, where):
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ValueError("{}: top_k must be an integer, got {!r}".format(where, value)) from None
    if not 1 <= k <= NUM_CLASSES:
        raise ValueError("{}: top_k must be in 1..{}, got {}".format(where, NUM_CLASSES, k))
    return k


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])
        version_dir = model_dir / str(args["model_version"])

        onnx_path = version_dir / params.get("onnx_file", "model.onnx")
        labels_path = model_dir / params.get("labels_file", "imagenet_classes.txt")
        self.top_k = _parse_top_k(params.get("top_k", "5"), "model parameter")
        threads = int(params.get("intra_op_threads", "0") or 0)

        if not onnx_path.is_file():
            raise pb_utils.TritonModelException(
                "{} is missing: generate it with `streamharness dev triton export` "
                "(streamharness.models.frame_encoder_export.export_frame_encoder)".format(onnx_path)
            )
        names = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) != NUM_CLASSES:
            raise pb_utils.TritonModelException(
                "{} has {} class names, expected {}".format(labels_path, len(names), NUM_CLASSES)
            )
        self.labels = np.array([name.encode("utf-8") for name in names], dtype=np.object_)

        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                device = int(args.get("model_instance_device_id", "0"))
                providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
            else:
                _log("warn", "GPU instance but onnxruntime has no CUDAExecutionProvider "
                             "(install onnxruntime-gpu); running on CPU")
        self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
        _log("info", "frame_encoder: {} on {}, top_k={}".format(onnx_path.name, self.session.get_providers(), self.top_k))

    def execute(self, requests):
        responses = [None] * len(requests)
        images, ks, owners = [], [], []
        for i, request in enumerate(requests):
            try:
                ks.append(self._request_top_k(request))
                images.append(pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy())
                owners.append(i)
            except ValueError as err:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=_error(str(err), True))
        if not images:
            return responses

        try:
            batch = images[0] if len(images) == 1 else np.concatenate(images)
            embeddings, logits = self.session.run(["embedding", "logits"], {"image": batch})
        except Exception as err:  # one failed forward fails the requests in it, not the model
            for i in owners:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=_error("onnxruntime: {}".format(err)))
            return responses

        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
        start = 0
        for i, k, image in zip(owners, ks, images):
            stop = start + image.shape[0]
            p = probs[start:stop]
            ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("EMBEDDING", np.ascontiguousarray(embeddings[start:stop], dtype=np.float32)),
                pb_utils.Tensor("TOP_SCORES", np.take_along_axis(p, ids, axis=1)),
                pb_utils.Tensor("TOP_LABELS", self.labels[ids]),
                pb_utils.Tensor("TOP_IDS", ids.astype(np.int32)),
            ])
            start = stop
        return responses

    def _request_top_k(self, request):
        raw = request.parameters() if hasattr(request, "parameters") else "{}"
        params = json.loads(raw) if raw else {}
        if "top_k" not in params:
            return self.top_k
        return _parse_top_k(params["top_k"], "request parameter")

    def finalize(self):
        self.session = None
