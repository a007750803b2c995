"""STAND-IN for NVIDIA's trtexec (TensorRT cannot be installed here): records its argv, prints
trtexec's banner and writes a file where --saveEngine points, optionally sleeping mid-write.

Environment: FAKE_TRTEXEC_RECORD (append argv as one JSON line), FAKE_TRTEXEC_VERSION (the
NV_TENSORRT_VERSION number in the banner, default 8602), FAKE_TRTEXEC_SLEEP (seconds to sleep
after writing half the plan), FAKE_TRTEXEC_STARTED (file touched once half the plan is written),
FAKE_TRTEXEC_EXIT (exit status, default 0).
"""

import json
import os
import sys
import time


def main() -> int:
    argv = sys.argv[1:]
    record = os.environ.get("FAKE_TRTEXEC_RECORD")
    if record:
        with open(record, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(argv) + "\n")
    version = os.environ.get("FAKE_TRTEXEC_VERSION", "8602")
    print(f"&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] # trtexec {' '.join(argv)}",
          flush=True)
    options = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    plan = options["saveEngine"]
    with open(plan, "wb") as handle:
        handle.write(b"FAKE-PLAN (stand-in trtexec) first half\n")
        handle.flush()
        started = os.environ.get("FAKE_TRTEXEC_STARTED")
        if started:
            open(started, "w").close()
        time.sleep(float(os.environ.get("FAKE_TRTEXEC_SLEEP", "0")))
        handle.write(json.dumps(argv).encode() + b"\n")
    cache = options.get("timingCacheFile")
    if cache:
        with open(cache, "a", encoding="utf-8") as handle:
            handle.write("timing entry\n")
    code = int(os.environ.get("FAKE_TRTEXEC_EXIT", "0"))
    print("&&&& PASSED TensorRT.trtexec" if code == 0 else "&&&& FAILED TensorRT.trtexec",
          flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
