"""Triton python backend: people detector (OpenCV's HOG + linear SVM pedestrian detector).

Served by the tritonserver in the ``nvidia-pytriton`` wheel (dev and tests) and by the official
``nvcr.io/nvidia/tritonserver`` image. Needs numpy < 2 and ``opencv-python-headless`` < 4.12 (opencv 5
has no ``cv2.HOGDescriptor``) in the python backend's environment; nothing from the ``streamharness``
package, and Python >= 3.8. The detector's weights ship inside OpenCV: nothing is downloaded.

Per request: IMAGE uint8 (H, W, 3) RGB, any size. Out: BOXES (n, 4) x, y, w, h in input pixels, best
first; SCORES (n,) SVM margins; COUNT (1,) = n. Steps: resize by ``upscale`` (the 64x128 window misses
people shorter than ~96 px), capped at ``max_pixels`` pixels (a bounded cost per frame whatever its
size), multi-scale HOG detection, drop boxes under ``score_threshold``, non-max
suppression at ``nms_threshold``, scale boxes back.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

# name -> (parse, check, what the check means); all come from config.pbtxt's parameters.
_PARAMETERS = {
    "upscale": (float, lambda v: 0.25 <= v <= 8.0, "in 0.25..8"),
    "max_pixels": (int, lambda v: v == 0 or v >= 64 * 128, "0 (no cap) or >= 8192 (one 64x128 window)"),
    "win_stride": (int, lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8"),
    "pyramid_scale": (float, lambda v: 1.0 < v <= 2.0, "in (1, 2]"),
    "score_threshold": (float, lambda v: 0.0 <= v <= 100.0, "in 0..100"),  # cv2.dnn.NMSBoxes refuses < 0
    "nms_threshold": (float, lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "threads": (int, lambda v: v >= 0, ">= 0"),
}
_DEFAULTS = {"upscale": "2.0", "max_pixels": "1228800", "win_stride": "8", "pyramid_scale": "1.1",
             "score_threshold": "1.0", "nms_threshold": "0.3", "threads": "0"}


def _log(level, message):
    logger = getattr(pb_utils, "Logger", None)  # Triton >= 23.04
    if logger is not None:
        getattr(logger, "log_" + level)(message)
    else:
        print("[people_detector] " + message, flush=True)


def _error(message, invalid_argument=False):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid_argument else None
    if code is not None:
        try:
            return pb_utils.TritonError(message, code)
        except TypeError:  # Triton < 23.10 has no error codes in the python backend
            pass
    return pb_utils.TritonError(message)


def _parameters(config):
    raw = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
    values = {}
    for name, (parse, check, meaning) in _PARAMETERS.items():
        text = raw.get(name) or _DEFAULTS[name]
        try:
            value = parse(text)
        except ValueError:
            raise pb_utils.TritonModelException(
                "people_detector: parameter {} must be a {}, got {!r}".format(name, parse.__name__, text)) from None
        if not check(value):
            raise pb_utils.TritonModelException(
                "people_detector: parameter {} must be {}, got {!r}".format(name, meaning, text))
        values[name] = value
    return values


class TritonPythonModel:
    def initialize(self, args):
        import cv2

        self.cv2 = cv2
        self.params = _parameters(json.loads(args["model_config"]))
        if self.params["threads"]:
            cv2.setNumThreads(self.params["threads"])
        if not hasattr(cv2, "HOGDescriptor"):
            raise pb_utils.TritonModelException(
                "people_detector: OpenCV {} has no HOGDescriptor (install opencv-python-headless<4.12)".format(cv2.__version__))
        self.hog = cv2.HOGDescriptor()  # the default 64x128 pedestrian window
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        _log("info", "people_detector: OpenCV {}, {}".format(
            cv2.__version__, ", ".join("{}={}".format(k, v) for k, v in sorted(self.params.items()))))

    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(
                    "IMAGE must be a non-empty (height, width, 3) RGB frame, got shape {}".format(list(image.shape)), True)))
                continue
            try:
                boxes, scores = self.detect(image)
            except Exception as err:  # one failed frame fails its request, not the model
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error("HOG detection: {}".format(err))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("BOXES", boxes),
                pb_utils.Tensor("SCORES", scores),
                pb_utils.Tensor("COUNT", np.array([len(scores)], dtype=np.int32)),
            ]))
        return responses

    def work_scale(self, height, width):
        """The factor a frame is resized by before detection: ``upscale``, lowered where the result
        would have more than ``max_pixels`` pixels (HOG's cost grows with the pixels searched)."""
        up, cap = self.params["upscale"], self.params["max_pixels"]
        if cap and height * width * up * up > cap:
            up = (cap / float(height * width)) ** 0.5
        return up

    def detect(self, image):
        """(boxes float32 (n, 4) x, y, w, h in input pixels, scores float32 (n,)), best first."""
        cv2, p = self.cv2, self.params
        up = self.work_scale(image.shape[0], image.shape[1])
        work = image if up == 1.0 else cv2.resize(
            image, None, fx=up, fy=up, interpolation=cv2.INTER_LINEAR if up > 1.0 else cv2.INTER_AREA)
        win_w, win_h = self.hog.winSize
        if work.shape[0] < win_h or work.shape[1] < win_w:
            # Nobody fits; and OpenCV 4.11's detectMultiScale crashes the process (SIGSEGV/SIGABRT,
            # not an exception) on some images smaller than its window.
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
        stride = (p["win_stride"], p["win_stride"])
        # HOG takes the strongest gradient over the colour channels, so RGB and BGR give the same result.
        rects, weights = self.hog.detectMultiScale(np.ascontiguousarray(work), winStride=stride, padding=(8, 8),
                                                   scale=p["pyramid_scale"])
        weights = np.asarray(weights, dtype=np.float32).reshape(-1)
        if len(rects) == 0:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
        rects = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
        keep = cv2.dnn.NMSBoxes(rects.tolist(), weights.tolist(), p["score_threshold"], p["nms_threshold"])
        keep = np.asarray(keep, dtype=np.int64).reshape(-1)
        keep = keep[np.argsort(-weights[keep], kind="stable")]
        return np.ascontiguousarray(rects[keep] / up, dtype=np.float32), np.ascontiguousarray(weights[keep])

    def finalize(self):
        self.hog = None
