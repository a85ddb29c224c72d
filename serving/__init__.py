"""Serving: Triton launcher, python-backend model, HTTP image API, clients and offline generation.

Nothing in this package imports torch: it runs on numpy, onnxruntime/TensorRT and tritonclient.
"""
