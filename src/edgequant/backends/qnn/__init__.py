"""QNN-ready ONNX: fixed-shape QDQ graphs for the Qualcomm HTP, checked on its simulator."""
