"""Deployment exports of trained detectors (ONNX, float and int8 QDQ)."""
