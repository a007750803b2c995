"""NVIDIA Jetson modules: an arm64 OCI image on the target's JetPack container, an ONNX model and
the key of the TensorRT engine the device builds for itself on first boot (issue 12).

- :mod:`.container`: which base the image is built on and which Python serves, per JetPack
  generation (and the explicit onnxruntime-CPU fallback where the runtime cannot run);
- :mod:`.backend`: the :class:`~packager.backends.base.Backend` (plan, execute, verify, notes);
- :mod:`.qdq_lint`, :mod:`.int8`, :mod:`.reference`: TensorRT's INT8 Q/DQ form, its lint, and the
  polygraphy reference inputs/outputs for an on-device comparison.

The on-device side (engine key, preflight, trtexec, engine build, the TensorRT runner) lives in
``packager/runtime/`` and ``templates/jetson/``.
"""
