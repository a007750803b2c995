"""The OTA agent checks the bundle signature (issue 15) in addition to TUF: a validly published
release that the bundle key did not sign, or whose files changed after signing, is refused and
never loaded; a signed one installs. Real TUF repository, fake engine (tests/unit/agent)."""

from __future__ import annotations

import json
from pathlib import Path

from packager.agent.agent import Agent, init_device
from packager.bundle.manifest import read_manifest, write_manifest
from packager.bundle.signing import generate_keypair, load_signer, sign_manifest
from packager.ota.repo import Repository
from tests.unit.agent.helpers import assert_complete, config, free_port, reports
from tests.unit.ota.synth import make_bundle


def _bundle(tmp: Path, version: str, key: Path | None) -> Path:
    path = make_bundle(tmp / f"bundle-{version}", version=version, model=version.encode()).path
    if key is not None:
        sign_manifest(path, load_signer(key), {"name": "demo", "version": version})
    return path


def _images(engine: Path) -> list[str]:
    return sorted(p.name for p in (engine.parent / "images").glob("*.json"))


def test_agent_installs_only_releases_the_bundle_key_signed(
    tmp_path: Path, repo: Repository, engine: Path
) -> None:
    good = generate_keypair(tmp_path / "keys", "bundle")
    other = generate_keypair(tmp_path / "keys", "other")
    port = free_port()
    root = tmp_path / "device"
    init_device(root, repo.trusted_root)
    cfg = config(root, (repo.path / "repository").as_uri(), engine, port, bundle_key=good.public)

    def refused(expect: str) -> None:
        result = Agent(cfg).run_once()
        assert result.outcome == "refused", result
        assert "bundle signature" in result.reason and expect in result.reason, result.reason
        assert reports(root)[-1]["outcome"] == "refused"
        assert _images(engine) == [], "a refused release was loaded"
        assert not (root / "current").exists()

    repo.publish(_bundle(tmp_path, "1.0.0", None))
    refused("not signed")
    repo.publish(_bundle(tmp_path, "2.0.0", other.private))
    refused("does not verify with the trusted key")
    # Signed, then a file changed and the manifest regenerated: TUF signs what it is given.
    tampered = _bundle(tmp_path, "3.0.0", good.private)
    (tampered / "install.sh").write_text("#!/bin/sh\necho owned\n")
    write_manifest(tampered, read_manifest(tampered).meta())
    repo.publish(tampered)
    refused("changed after signing")
    repo.publish(_bundle(tmp_path, "4.0.0", good.private))
    result = Agent(cfg).run_once()
    assert result.outcome == "committed", result
    assert_complete(root, 4, port)
    assert (root / "releases" / "4" / "manifest.dsse.json").is_file()


def test_agent_config_file_carries_the_bundle_key(tmp_path: Path) -> None:
    from packager.agent.__main__ import _parser, config_from

    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"root": str(tmp_path), "repo": "http://127.0.0.1:19301/",
                                "bundle_key": "/opt/edgepack/ota-agent/bundle-key.pem"}))
    cfg = config_from(_parser().parse_args(["run", "--config", str(path)]))
    assert cfg.bundle_key == Path("/opt/edgepack/ota-agent/bundle-key.pem")
