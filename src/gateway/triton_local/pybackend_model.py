"""Triton Python-backend model that runs an ONNX file with onnxruntime on CPU.

``gateway triton-local`` copies this file into a temporary model repository as
``<model>/1/model.py``, beside a link to the production ``model.onnx``. Triton's
dynamic batcher hands ``execute`` every request of a batch at once; they are
concatenated and run through onnxruntime in one call, then the output is split
back per request, so one execution serves the whole batch as the ONNX Runtime
backend would.

This file runs inside Triton's Python stub, not in the gateway: it imports only
numpy, onnxruntime and Triton's ``triton_python_backend_utils``.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by the stub


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        opts = ort.SessionOptions()
        # One onnxruntime thread per model instance: Triton runs instances in
        # parallel, and this machine class has 2 cores shared with the gateway.
        opts.intra_op_num_threads = int(os.environ.get("TRITON_LOCAL_ORT_THREADS", "1"))
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.path.join(version_dir, "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )

    def execute(self, requests):
        arrays = [
            pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests
        ]
        sizes = [a.shape[0] for a in arrays]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        try:
            out = self.session.run([self.output_name], {self.input_name: batch})[0]
        except Exception as exc:  # one bad batch must not take the model down
            err = pb_utils.TritonError(f"onnxruntime failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        responses = []
        start = 0
        for n in sizes:
            part = out[start : start + n]
            start += n
            tensor = pb_utils.Tensor(self.output_name, np.ascontiguousarray(part))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self):
        self.session = None
