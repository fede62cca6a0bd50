"""OpenVINO IR through optimum-intel, NNCF weight compression and openvino-genai."""
