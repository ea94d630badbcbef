"""deltadiff.runtime: the lean runtime (numpy + Pillow + onnxruntime / TensorRT + cuda-python;
never torch): manifest, backends, executor, tiling, image I/O, batch jobs (``dd-run``)."""

__all__ = ["Upscaler", "UpscaleOptions", "load_manifest"]


def __getattr__(name: str):  # noqa: ANN202 - lazy re-exports keep ``import deltadiff.runtime`` cheap
    if name in ("Upscaler", "UpscaleOptions"):
        from deltadiff.runtime import upscaler

        return getattr(upscaler, name)
    if name == "load_manifest":
        from deltadiff.manifest import load_manifest

        return load_manifest
    raise AttributeError(name)
