"""Deployment exports of trained detectors, with the `onnx` and `onnxruntime` of `jaxcomp[export]`.

- `jaxcomp.export.onnx`: the detector as an ONNX graph, float or int8 (QDQ), and
  `export_run` for a finished run's workdir;
- `jaxcomp.export.run`: a finished run's model, read from its workdir;
- `jaxcomp.export.check`: the export run in ONNX Runtime against jaxcomp;
- `python -m jaxcomp.export`: the command line (see docs/deployment.md).
"""
