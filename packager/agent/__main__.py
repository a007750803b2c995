"""Command line of the device agent (standard library argparse: the device has no click).

python3 -m edgepack_agent init --root /var/lib/edgepack-ota --trusted-root root.json
python3 -m edgepack_agent run --config /etc/edgepack/ota-agent.json --once
python3 -m edgepack_agent status --root /var/lib/edgepack-ota
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

from .agent import Agent, AgentConfig, init_device
from .engine import EngineError
from .protocol import USB_SUBDIR
from .store import read_json
from .trust import TrustError

log = logging.getLogger("edgepack.agent")
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def _default_device_id() -> str:
    for path in (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id")):
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
    return platform.node()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgepack-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="install the repository's root.json as the trust anchor")
    init.add_argument("--root", type=Path, required=True)
    init.add_argument("--trusted-root", type=Path, required=True)
    status = sub.add_parser("status", help="print the device's update state as JSON")
    status.add_argument("--root", type=Path, required=True)
    run = sub.add_parser("run", help="check for and install updates")
    run.add_argument("--config", type=Path, help="JSON file with any of the options below")
    run.add_argument("--root", type=Path)
    source = run.add_mutually_exclusive_group()
    source.add_argument("--repo", help="repository base URL (http://host/path/)")
    source.add_argument("--usb", type=Path, help="a directory written by 'edgepack ota export'")
    run.add_argument("--device-id")
    run.add_argument("--platform", help="linux/amd64 or linux/arm64 (default: this machine)")
    run.add_argument("--device-class", help="the bundles' device class (default linux-container)")
    run.add_argument(
        "--facts-probe-arg",
        action="append",
        dest="facts_probe",
        default=None,
        metavar="ARG",
        help="one word of the program that prints this device's facts for release"
        " requirements (repeat, in order; an absolute program path first), e.g."
        " --facts-probe-arg /usr/bin/python3 --facts-probe-arg /opt/edgepack/NAME/"
        "jetson_preflight.py --facts-probe-arg=--facts",
    )
    run.add_argument("--facts-timeout", type=float, dest="facts_timeout_s")
    run.add_argument("--channel")
    run.add_argument("--engine", help="docker or podman (or a path)")
    run.add_argument("--engine-arg", action="append", dest="engine_args", default=None)
    run.add_argument("--port", type=int)
    run.add_argument("--report-url")
    run.add_argument("--report-file", type=Path)
    run.add_argument("--ready-timeout", type=float, dest="ready_timeout_s")
    run.add_argument("--trial", type=float, dest="trial_s")
    run.add_argument("--poll", type=float, dest="poll_s")
    run.add_argument("--once", action="store_true", help="run one cycle and exit")
    run.add_argument("--interval", type=float, default=900.0, help="seconds between cycles")
    return parser


def config_from(args: argparse.Namespace) -> AgentConfig:
    """Options from --config, overridden by the command line."""
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(json.loads(args.config.read_text(encoding="utf-8")))
    for key in (
        "root", "repo", "usb", "device_id", "platform", "channel", "engine", "engine_args",
        "port", "report_url", "report_file", "ready_timeout_s", "trial_s", "poll_s",
        "device_class", "facts_probe", "facts_timeout_s",
    ):  # fmt: skip
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    if "root" not in values:
        raise SystemExit("edgepack-agent: --root (or 'root' in --config) is required")
    usb = values.pop("usb", None)
    repo = values.pop("repo", None)
    if usb is not None:
        repo = Path(usb).resolve().joinpath(USB_SUBDIR).as_uri() + "/"
        values.setdefault("report_file", Path(usb) / USB_SUBDIR / "reports" / "device.jsonl")
        # The stick's own directories are untrusted: no symlink below the directory given.
        values.setdefault("report_root", Path(usb))
    if repo is None:
        raise SystemExit("edgepack-agent: give --repo URL or --usb DIR")
    device_id = values.pop("device_id", None) or _default_device_id()
    plat = values.pop("platform", None) or f"linux/{_ARCH.get(platform.machine(), 'unknown')}"
    if values.get("report_root") is not None:
        values["report_root"] = Path(values["report_root"])
    if "report_file" in values and values["report_file"] is not None:
        values["report_file"] = Path(values["report_file"])
        if usb is not None and values["report_file"].name == "device.jsonl":
            values["report_file"] = values["report_file"].with_name(f"{device_id}.jsonl")
    values["engine_args"] = tuple(values.get("engine_args") or ())
    if values.get("bundle_key") is not None:
        values["bundle_key"] = Path(values["bundle_key"])
    if isinstance(values.get("facts_probe"), list):
        # Anything else (a string, a number) is kept as given: the probe's own check
        # (packager.agent.engine.argv_problem) names it, and the facts are unknown.
        values["facts_probe"] = tuple(values["facts_probe"])
    return AgentConfig(
        root=Path(values.pop("root")), repo_url=repo, device_id=device_id, platform=plat, **values
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``init``, ``status`` or ``run`` (looping every --interval seconds unless --once).

    Exit status with --once: 0 for a cycle that ended anything but failed, rolled-back or
    refused; 3 for one that did; 1 when the cycle raised EngineError, TrustError or OSError.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    if args.command == "init":
        init_device(args.root, args.trusted_root)
        return 0
    if args.command == "status":
        sys.stdout.write(json.dumps(read_json(args.root / "state.json"), indent=2) + "\n")
        return 0
    config = config_from(args)
    while True:
        try:
            result = Agent(config).run_once()
        except (EngineError, TrustError, OSError) as exc:
            log.error("cycle failed: %s", exc)
            if args.once:
                return 1
        else:
            sys.stdout.write(json.dumps(result.to_json(), sort_keys=True) + "\n")
            sys.stdout.flush()
            if args.once:
                return 0 if result.outcome not in ("failed", "rolled-back", "refused") else 3
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
