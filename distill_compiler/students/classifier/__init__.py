"""The encoder classifier student (task classify): LP-FT with soft-label KD, ONNX int8 export,
evaluation and cascade fitting on the shipped model."""
