"""Export: trained networks to verified bundles (ONNX, torch weights, TensorRT plans), parity and probes."""


class ExportError(ValueError):
    """An export step that refuses to go on (missing inputs, a backend that breaks the certificate policy)."""
