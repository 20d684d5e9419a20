"""Deployment targets: ONNX export, ONNX Runtime, TensorRT."""
