"""Error types. Every user-facing failure is a DeltaDiffError whose message is one line:
what is wrong, the value seen, and the fix. Only the CLIs catch them."""


class DeltaDiffError(Exception):
    """Base class for expected, user-facing errors."""


class ConfigError(DeltaDiffError):
    """A model config (preset or upstream YAML) is invalid or unsupported."""


class CheckpointError(DeltaDiffError):
    """A weight file cannot be read, or does not fit the model config."""


class ManifestError(DeltaDiffError):
    """A model directory's manifest is missing, malformed, or does not vouch for its files."""


class ImageError(DeltaDiffError):
    """An input image cannot be read, or an output cannot be written."""


class BackendError(DeltaDiffError):
    """A runtime backend cannot load or run a graph / engine."""


class EngineError(BackendError):
    """A TensorRT engine is missing, stale, or was built for another GPU / TensorRT."""


class MissingDependencyError(DeltaDiffError):
    """An optional dependency is not installed."""


class VerificationError(DeltaDiffError):
    """A backend's output is outside the tolerance of the reference."""
