"""Triton Python-backend model ``deltadiff``: one encoded image in, the x4 PNG out.

Written by ``dd-run serve`` and ``dd-export triton`` as ``deltadiff/1/model.py``. The work is done
by ``deltadiff.runtime.serving.serve`` (install ``deltadiff-trt`` in the server's Python): the lean
runtime's ``Upscaler`` pads, tiles, draws the seeded noise and blends; its executor runs the
step table either on a local backend (``stages=local``) or on the repository's stage models
through BLS requests (``stages=bls``). Requests of one dynamic batch are upscaled together, their
tiles merged into batched stage calls. A bad request gets INVALID_ARG (HTTP 400) with one line.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from deltadiff.errors import BackendError
from deltadiff.runtime.serving.serve import INPUT, OUTPUT, SEED, RequestError, build_service


def _bls(model: str, feeds: dict, outputs: list) -> dict:
    req = pb_utils.InferenceRequest(
        model_name=model,
        requested_output_names=outputs,
        inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in feeds.items()],
    )
    resp = req.exec()
    if resp.has_error():
        raise BackendError(f"stage model {model}: {resp.error().message()}")
    return {o: pb_utils.get_output_tensor_by_name(resp, o).as_numpy() for o in outputs}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        here = Path(args["model_repository"]) / args["model_version"]
        self.service = build_service(params, here, _bls)

    def execute(self, requests: list) -> list:
        items, owner = [], []
        for i, r in enumerate(requests):
            img = pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy()
            seed_t = pb_utils.get_input_tensor_by_name(r, SEED)
            seeds = seed_t.as_numpy().reshape(-1).tolist() if seed_t is not None else []
            for k, row in enumerate(img):
                seed = seeds[min(k, len(seeds) - 1)] if seeds else self.service.up.opts.seed
                items.append((row, int(seed)))
                owner.append(i)
        results = self.service.handle(items)
        responses = []
        for i in range(len(requests)):
            mine = [res for res, o in zip(results, owner, strict=True) if o == i]
            err = next((e for e in mine if isinstance(e, Exception)), None)
            if err is None:
                out = np.array([[b] for b in mine], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT, out)]))
            else:
                code = (
                    pb_utils.TritonError.INVALID_ARG
                    if isinstance(err, RequestError)
                    else pb_utils.TritonError.INTERNAL
                )
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), code))
                )
        return responses

    def finalize(self) -> None:
        self.service.close()
