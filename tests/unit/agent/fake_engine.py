"""A stand-in for podman/docker in the agent's unit tests (run as a program, like the real one).

It really loads the image tar (reads index.json -> manifest -> config) and really serves the
readiness endpoint on the published port from a separate process, so the agent's trial, watchdog
and rollback logic run against real HTTP. State lives in $FAKE_ENGINE_STATE.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

STATE = Path(os.environ["FAKE_ENGINE_STATE"])
SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
code = 200 if sys.argv[2] == "yes" else 503
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(code if self.path == "/v2/health/ready" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _key(text: str) -> str:
    return text.replace("/", "_").replace(":", "_")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _kill(name: str) -> None:
    path = STATE / "containers" / f"{_key(name)}.json"
    if path.exists():
        pid = json.loads(path.read_text())["pid"]
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        # Like `podman stop/rm`: return once the container is gone (and its port free), within
        # a bound; a runtime still alive after that is what the engine fixture's finalizer kills.
        for _ in range(200):
            if not _alive(pid):
                break
            time.sleep(0.01)
        path.unlink()


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        # As the servers do (HTTPServer.allow_reuse_address): a closed connection's TIME_WAIT on
        # the port does not count, a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# A foreground container (`run --rm` without -d, the agent's prepare step): what it does is set by
# $FAKE_ENGINE_STATE/prepare-mode: "ok" (default), "fail" (exit 4 with a builder's last line) or
# "hang" (runs until removed). Its process stands for the container: `rm -f NAME` kills it.
FOREGROUND = """
import sys, time
mode = sys.argv[1]
print("engine build: building the plan (stand-in container)", flush=True)
if mode == "hang":
    time.sleep(300)
if mode == "fail":
    print("engine build: TensorRT: expected 8.6.2, found 8.5.2 (stand-in)", flush=True)
    sys.exit(4)
print("engine build: built (stand-in)", flush=True)
"""


def _run_foreground(argv: list[str]) -> int:
    name = argv[argv.index("--name") + 1]
    ref = argv[argv.index("-m") - 1]
    if not (STATE / "images" / f"{_key(ref)}.json").exists():
        print(f"no image {ref}", file=sys.stderr)
        return 125
    record = STATE / "containers" / f"{_key(name)}.json"
    if record.exists():
        print(f"the container name {name!r} is already in use", file=sys.stderr)
        return 125
    mode_file = STATE / "prepare-mode"
    mode = mode_file.read_text().strip() if mode_file.exists() else "ok"
    proc = subprocess.Popen([sys.executable, "-c", FOREGROUND, mode], start_new_session=True)
    record.write_text(json.dumps({"pid": proc.pid, "ref": ref, "port": None}))
    code = proc.wait()
    record.unlink(missing_ok=True)  # --rm
    return code


def main(argv: list[str]) -> int:
    (STATE / "images").mkdir(parents=True, exist_ok=True)
    (STATE / "containers").mkdir(parents=True, exist_ok=True)
    with (STATE / "calls.log").open("a") as log:
        log.write(" ".join(argv) + "\n")
    cmd = argv[0]
    if cmd == "load":
        with tarfile.open(argv[argv.index("-i") + 1]) as tar:

            def read(name: str) -> bytes:
                member = tar.extractfile(name)
                assert member is not None
                return member.read()

            index = json.loads(read("index.json"))
            entry = index["manifests"][0]
            manifest = json.loads(read("blobs/sha256/" + entry["digest"][7:]))
            config = json.loads(read("blobs/sha256/" + manifest["config"]["digest"][7:]))
            for layer in manifest["layers"]:
                read("blobs/sha256/" + layer["digest"][7:])  # every layer must be there
            # As `podman load` of the archive names it: the docker manifest's RepoTags (a real
            # build's OCI ref.name is only the tag).
            names = tar.getnames()
            legacy = json.loads(read("manifest.json")) if "manifest.json" in names else []
            tags = legacy[0].get("RepoTags") if legacy else None
            ref = tags[0] if tags else entry["annotations"]["org.opencontainers.image.ref.name"]
        # Synthetic bundles (tests/unit/ota/synth.py) choose; a real built image serves ready.
        ready = (config["config"].get("Labels") or {}).get("edgepack.test.ready", "yes")
        (STATE / "images" / f"{_key(ref)}.json").write_text(json.dumps({"ready": ready}))
        return 0
    if cmd in ("stop", "rm"):
        _kill(argv[-1])
        return 0
    if cmd == "rmi":
        (STATE / "images" / f"{_key(argv[-1])}.json").unlink(missing_ok=True)
        return 0
    if cmd == "inspect":
        path = STATE / "containers" / f"{_key(argv[-1])}.json"
        if path.exists() and _alive(json.loads(path.read_text())["pid"]):
            print("true")
            return 0
        print("false")
        return 1 if not path.exists() else 0
    if cmd == "run" and "-d" not in argv:
        return _run_foreground(argv)
    if cmd == "run":
        name = argv[argv.index("--name") + 1]
        port = argv[argv.index("-p") + 1].split(":")[0]
        ref = argv[-1]
        image = STATE / "images" / f"{_key(ref)}.json"
        if not image.exists():
            print(f"no image {ref}", file=sys.stderr)
            return 125
        ready = json.loads(image.read_text())["ready"]
        if _port_taken(int(port)):
            # What podman says when another process (say a runtime that outlived its container)
            # holds the published port: the container does not start.
            print(
                f"cannot listen on the TCP port: listen tcp4 :{port}: bind: address already in use",
                file=sys.stderr,
            )
            return 126
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, port, ready],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        (STATE / "containers" / f"{_key(name)}.json").write_text(
            json.dumps({"pid": proc.pid, "ref": ref, "port": int(port)})
        )
        for _ in range(100):  # like `run -d`: return once the process is up
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", int(port))) == 0:
                    break
            time.sleep(0.05)
        return 0
    print(f"fake engine: unsupported {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
