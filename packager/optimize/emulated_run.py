"""Run one ONNX model on saved inputs and save its outputs: the program
``packager.optimize.emulated`` starts under qemu-user, so the model is computed by the
onnxruntime kernels of the emulated CPU.

Usage: ``python emulated_run.py MODEL.onnx FEEDS.npz OUT.npz``. FEEDS holds ``s<i>_<j>`` (sample
i, input j), ``names`` (the input names) and ``count`` (the number of samples); OUT gets
``s<i>_<k>`` (sample i, output k).
Imports only numpy and onnxruntime: it runs as a plain script, outside the package.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """Run MODEL on every sample in FEEDS (onnxruntime CPU, one thread) and save OUT; returns 0.

    ``argv``: the three paths (module docstring).
    """
    import numpy as np
    import onnxruntime as ort

    model, feeds_path, out_path = argv
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    with np.load(feeds_path, allow_pickle=False) as feeds:
        names = [str(n) for n in feeds["names"]]
        count = int(feeds["count"])
        results: dict[str, object] = {}
        for i in range(count):
            feed = {name: feeds[f"s{i}_{j}"] for j, name in enumerate(names)}
            for k, value in enumerate(session.run(None, feed)):
                results[f"s{i}_{k}"] = value
    np.savez(out_path, **results)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
