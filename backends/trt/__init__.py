"""The ``trt-a100`` target (TensorRT on an NVIDIA A100). Nothing heavy is imported here:
``tensorrt`` is imported lazily by the modules that need it; :mod:`.cost` is pure Python.
"""
