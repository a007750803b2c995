"""``edgepack engine build BUNDLE --on ssh://[USER@]HOST[:PORT]``: prebuild a bundle's engine on a
reference device and add it to the bundle.

A TensorRT plan can only be built on the device model it runs on, and a first build takes
minutes; built once on a reference device of the same model, it ships in the bundle and every
device of the fleet installs it instead of building (its key file must equal the expected key).

The bundle is rewritten whole or not at all:

1. read and type ``manifest.json`` once (every later step uses those bytes), check every
   checksum and the device class's own checks (a damaged bundle is never re-hashed into a
   valid-looking one);
2. signature: a signed bundle's signature no longer covers a rewritten manifest, so
   ``--sign-key`` is required (exit 2 without it), and the bundle's current signature must
   verify with that key (exit 8 otherwise): re-signing never launders a bundle signed by
   someone else or changed since. An unsigned bundle stays unsigned unless ``--sign-key`` is
   given. ``provenance.intoto.json`` is left as it is: it attests the original build, and the
   plan is not one of its subjects;
3. the backend builds the plan on the device (packager.backends.engine_on; nothing is added
   when it fails, times out or returns a key other than the manifest's);
4. a staging directory beside the bundle gets the bundle's files (hard links, copies where the
   file system has none), the plan and its key file, a new SHA256SUMS and manifest.json (the
   typed Manifest: same sections, new file list) and, when signing, a new signature; it then
   replaces the bundle in one rename (packager.staging.replace_dir). The bundle must not change
   meanwhile (its manifest.json is compared with the bytes verified before the swap).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import click
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

from packager.backends import get_backend
from packager.backends.engine_on import AddedFile, BuildsEngineOn, EngineBuildOn
from packager.bundle.manifest import (
    MANIFEST,
    SIGNATURE,
    SUMS,
    BundleMeta,
    Manifest,
    load_manifest,
    write_manifest,
)
from packager.bundle.signing import (
    SIGN_KEY_ENV,
    load_signer,
    sign_manifest,
)
from packager.bundle.verify import verify_bundle
from packager.console import console
from packager.digest import sha256_path
from packager.errors import InputError, UnsupportedError, UsageError, VerifyError
from packager.staging import make_staging_dir, replace_dir
from packager.tools.ssh import SshOptions, check_option_path, parse_ssh_url

# Files rewritten in the new bundle (never linked: the old bundle's must stay untouched).
REWRITTEN = (MANIFEST, SUMS, SIGNATURE)
DEFAULT_TIMEOUT_S = 3600
MAX_TIMEOUT_S = 24 * 3600
DEFAULT_PROGRESS_S = 30


@click.group("engine")
def engine_group() -> None:
    """Accelerator engines of a bundle (TensorRT plans)."""


@engine_group.command("build")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--on", "on", required=True, metavar="ssh://[USER@]HOST[:PORT]",
              help="The reference device (same module and JetPack as the fleet).")
@click.option("--known-hosts", type=click.Path(path_type=Path),
              help="The known_hosts file holding the device's host key (the only one read; "
                   "default: ssh's own). Unknown or changed host keys are refused.")
@click.option("--identity", type=click.Path(path_type=Path),
              help="The ssh private key to log in with (default: ssh-agent / ssh_config).")
@click.option("--sign-key", type=click.Path(path_type=Path), envvar=SIGN_KEY_ENV,
              help="Re-sign the rewritten manifest (required for a signed bundle; its "
                   f"signature must verify with this key) [${SIGN_KEY_ENV}].")
@click.option("--timeout", "timeout_s", type=click.IntRange(1, MAX_TIMEOUT_S),
              default=DEFAULT_TIMEOUT_S, show_default=True,
              help="Seconds the build on the device may take before it is stopped.")
@click.option("--trtexec", default=None, metavar="PATH",
              help="trtexec on the device [/usr/src/tensorrt/bin/trtexec].")
@click.option("--lib-dir", "lib_dirs", multiple=True, metavar="DIR",
              help="Where the device's libnvinfer.so.X.Y.Z is (repeatable) [JetPack's].")
@click.option("--python", "python", default="python3", show_default=True, metavar="PATH",
              help="The device's Python 3 (runs edgepack's engine builder there).")
@click.option("--device-root", default="/", hidden=True,
              help="Read the device's identity files under this directory (fixture trees).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def engine_build_cmd(
    bundle: Path, on: str, known_hosts: Path | None, identity: Path | None,
    sign_key: Path | None, timeout_s: int, trtexec: str | None, lib_dirs: tuple[str, ...],
    python: str, device_root: str, as_json: bool,
) -> None:
    """Build BUNDLE's engine on a reference device over ssh and add it to BUNDLE."""
    console.configure(quiet=as_json)
    # Everything the user typed is checked before anything connects or reads the bundle.
    host = parse_ssh_url(on)
    for value, where in ((trtexec, "--trtexec"), (python, "--python"),
                         (device_root, "--device-root"), *((d, "--lib-dir") for d in lib_dirs)):
        if value is not None:
            _check_remote_word(value, where)
    options = SshOptions(
        known_hosts=check_option_path(known_hosts, "--known-hosts") if known_hosts else None,
        identity=check_option_path(identity, "--identity") if identity else None,
    )
    # manifest.json is read once: its class decides what follows, and those same bytes are
    # verified (signature included) and rewritten; never a second copy from the disk.
    loaded = load_manifest(bundle)
    manifest = loaded.manifest
    backend = get_backend(manifest.target.device_class)
    if not isinstance(backend, BuildsEngineOn):
        raise UnsupportedError(
            f"{bundle / MANIFEST}: target {manifest.target.name} has no engine to prebuild "
            f"(device class {manifest.target.device_class})")
    signed = (bundle / SIGNATURE).exists()
    signer = _signer(bundle, sign_key, signed)
    # A signed bundle's signature must verify with the re-signing key and cover the manifest
    # as read (VerifyError, exit 8): re-signing never launders someone else's bundle.
    check = verify_bundle(bundle, get_backend, loaded=loaded,
                          key=signer.public_key if signer is not None and signed else None)
    problems = check.problems
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerifyError(f"{bundle}: {problems[0]}{more}", details=tuple(problems[1:]),
                          hint="rebuild it; a damaged bundle is not re-hashed")
    before = check.read.sha256  # the bytes verified: a change since is caught before the swap
    work = make_staging_dir(bundle)
    try:
        job = EngineBuildOn(
            host=host, ssh=options, timeout_s=timeout_s, progress_s=DEFAULT_PROGRESS_S,
            trtexec=trtexec, lib_dirs=lib_dirs, python=python, device_root=device_root,
            work=work / "remote", on_line=console.status,
        )
        job.work.mkdir()
        added = backend.build_engine_on(bundle, manifest, job)
        staging = work / "bundle"
        new = _assemble(bundle, manifest, added, staging)
        if signer is not None:
            keyid = sign_manifest(staging, signer, {"name": manifest.name,
                                                    "version": manifest.version,
                                                    "target": manifest.target.name})
            console.status(f"signed manifest.json with key {keyid[:16]}")
        if sha256_path(bundle / MANIFEST)[0] != before:
            raise InputError(f"{bundle / MANIFEST}: changed while the engine was built; "
                             "nothing was added", hint="run the command again")
        replace_dir(staging, bundle)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    records = {entry.path: entry for entry in new.files}
    if as_json:
        console.json({
            "bundle": str(bundle), "on": host.url, "signed": signer is not None,
            "added": [{"path": f.path, "sha256": records[f.path].sha256,
                       "size": records[f.path].size} for f in added],
        })
        return
    for entry in added:
        record = records[entry.path]
        console.result(f"added:    {entry.path} ({record.size:,} bytes, sha256 "
                       f"{record.sha256[:16]}...)")
    console.result(f"bundle:   {bundle} (manifest rewritten"
                   f"{', re-signed' if signer is not None else ''})")


def _check_remote_word(value: str, where: str) -> None:
    """A path on the device: plain characters, absolute unless a bare program name."""
    if not re.fullmatch(r"[A-Za-z0-9._/+-]{1,1024}", value, re.ASCII) or value.startswith("-") \
            or "/../" in f"/{value}/":
        raise UsageError(f"{where}: {value[:200]!r}: use a plain path on the device (letters, "
                         "digits and '._/+-', no '..', not starting with '-')")


def _signer(bundle: Path, sign_key: Path | None, signed: bool) -> CryptoSigner | None:
    """The signer for the rewritten manifest, or None; refuses a ``signed`` bundle without one
    (that the signature is this key's is verify_bundle's check, over the manifest as read)."""
    if sign_key is None:
        if signed:
            raise UsageError(
                f"{bundle / SIGNATURE}: the bundle is signed, and adding the engine rewrites "
                "manifest.json, which the old signature does not cover",
                hint=f"pass --sign-key KEY (or ${SIGN_KEY_ENV}) with the key that signed it")
        return None
    return load_signer(sign_key)


def _link_or_copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _assemble(bundle: Path, manifest: Manifest, added: tuple[AddedFile, ...],
              staging: Path) -> Manifest:
    """The new bundle in ``staging``: the old files (the rewritten ones aside), ``added``, and
    a new SHA256SUMS + manifest.json with the same sections."""
    staging.mkdir(mode=0o755)
    replaced = {entry.path for entry in added}
    for entry in manifest.files:
        if entry.path in REWRITTEN or entry.path in replaced:
            continue
        _link_or_copy(bundle / entry.path, staging / entry.path)
    for item in added:
        dest = staging / item.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item.source, dest)
        os.chmod(dest, 0o644)
    meta = BundleMeta.model_validate(
        {k: v for k, v in manifest.model_dump(exclude_none=True).items()
         if k not in ("schema_", "files")})
    return write_manifest(staging, meta)
