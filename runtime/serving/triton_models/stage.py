"""Triton Python-backend stage model: one graph of a model directory on the lean runtime.

Written by ``dd-export triton --engine python`` as ``<graph>/1/model.py`` beside a copy of the
manifest and the graph file. Inputs and outputs are the manifest's (full shapes, batch first,
``max_batch_size: 0``): the ``deltadiff`` model batches tiles itself.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from deltadiff.manifest import load_manifest
from deltadiff.runtime.backends import open_backend


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        here = Path(args["model_repository"]) / args["model_version"]
        m = load_manifest(here, check_hashes=False)
        self.graph = params["graph"]
        precision = params.get("precision", "fp32")
        rec = m.graph(self.graph, precision)
        self.inputs = [s.name for s in rec.inputs]
        self.backend = open_backend(
            params.get("backend", "onnxruntime"),
            here,
            m,
            precision=precision,
            threads=int(params.get("threads", 0)),
        )

    def execute(self, requests: list) -> list:
        responses = []
        for r in requests:
            try:
                feeds = {}
                for n in self.inputs:
                    t = pb_utils.get_input_tensor_by_name(r, n)
                    if t is not None:
                        feeds[n] = t.as_numpy()
                out = self.backend.run(self.graph, feeds)
                responses.append(
                    pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()])
                )
            except Exception as exc:  # one line per failed request; the model keeps serving
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(
                            f"{self.graph}: {exc}", pb_utils.TritonError.INTERNAL
                        )
                    )
                )
        return responses

    def finalize(self) -> None:
        self.backend.close()
