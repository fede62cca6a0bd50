"""The formats edgequant ships: one package per format (gguf, onnx, openvino, mlx, qnn and the
PyTorch baseline), each holding its Backend (`backend.py`), its Runner (`runner.py`) and its
engine helpers; `_shared` holds what several formats use. They are registered through the
`edgequant.backends` entry-point group like any third-party backend (see `edgequant.registry`)."""
