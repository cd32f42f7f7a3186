"""ONNX export of registered models (``onnx_export``, torch side) and their torch-free consumer (``onnx_runtime``)."""
