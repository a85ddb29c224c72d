"""Run a TensorRT engine from numpy without torch: TensorRT's Python API + cuda-python for device memory.

Only usable inside NVIDIA's containers with a GPU (see exporters/tensorrt_export.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TensorRTRunner:
    def __init__(self, engine_path: str | Path, check: bool = True):
        import tensorrt as trt

        try:
            from cuda.bindings import runtime as cudart
        except ImportError:  # older cuda-python layout
            from cuda import cudart  # type: ignore[no-redef]
        if check:
            from exporters.tensorrt_export import load_engine

            self.engine, self.meta = load_engine(engine_path)
        else:
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.trt, self.cudart = trt, cudart
        self.context = self.engine.create_execution_context()
        err, self.stream = cudart.cudaStreamCreate()
        self._check(err)
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def _check(self, err):
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        trt, cudart = self.trt, self.cudart
        ptrs, outputs = [], {}
        try:
            for name in self.names:
                if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                    arr = np.ascontiguousarray(feeds[name])
                    self.context.set_input_shape(name, arr.shape)
                    err, ptr = cudart.cudaMalloc(arr.nbytes)
                    self._check(err)
                    ptrs.append(ptr)
                    self._check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes,
                                                       cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream)[0])
                    self.context.set_tensor_address(name, ptr)
            for name in self.names:
                if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                    shape = tuple(self.context.get_tensor_shape(name))
                    dtype = trt.nptype(self.engine.get_tensor_dtype(name))
                    out = np.empty(shape, dtype=dtype)
                    err, ptr = cudart.cudaMalloc(out.nbytes)
                    self._check(err)
                    ptrs.append(ptr)
                    self.context.set_tensor_address(name, ptr)
                    outputs[name] = (out, ptr)
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execution failed")
            for out, ptr in outputs.values():
                self._check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes,
                                                   cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream)[0])
            self._check(cudart.cudaStreamSynchronize(self.stream)[0])
        finally:
            for p in ptrs:
                cudart.cudaFree(p)
        return next(iter(outputs.values()))[0]
