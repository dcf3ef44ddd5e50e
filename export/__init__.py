"""Build-time side of DiffEIC: PyTorch models that load the official checkpoints,
entropy tables, ONNX export and TensorRT engine builds. Never imported by ``runtime``."""
