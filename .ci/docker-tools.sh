#!/usr/bin/env bash
# Fetch Debian trixie's Docker engine (docker.io, docker-cli), containerd, docker-buildx, tini and
# the distribution registry (docker-registry) and unpack them into an ignored tools folder
# (default: .ci/docker-tools) for the tests that drive a private dockerd and a loopback registry
# (tests/integration/dockerd.py). Issue 13.
#
# Why trixie: bookworm's docker.io 20.10 lacks OCI export, multi-platform builds and
# `RUN --network`; trixie's 26.1 has them, and its Go binaries need only glibc 2.34 (bookworm has
# 2.36). runc is NOT taken from trixie (its build needs glibc 2.38): the host's bookworm runc
# (`make apt`) is used.
#
# The system's apt configuration is never changed: a private sources.list, state and cache under
# the tools folder (Dir::Etc::sourcelist, Dir::State, Dir::Cache); apt still checks the Release
# signature against the bookworm debian-archive-keyring package (2023.3+deb12u2 carries the trixie
# keys) and every .deb against the signed Packages index. Nothing is installed: `dpkg-deb -x` only.
#
# Idempotent: when the folder already holds a complete unpack of the same package list this
# exits at once (VERSIONS is written last). Works as root or not; needs apt-get and dpkg-deb.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$REPO/.ci/docker-tools}"
PACKAGES=(docker.io docker-cli containerd docker-buildx tini docker-registry)
SUITES=("http://deb.debian.org/debian trixie main" "http://deb.debian.org/debian-security trixie-security main")
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
TRIXIE_KEY=41587F7DB8C774BCCF131416762F67A0B2C39DE4  # Debian 13 (trixie) release key
WANT="packages: ${PACKAGES[*]}"

complete() {
    [ -f "$DEST/VERSIONS" ] && [ "$(head -1 "$DEST/VERSIONS")" = "$WANT" ] || return 1
    local tool
    for tool in docker dockerd containerd containerd-shim-runc-v2 docker-init docker-proxy \
            docker-registry; do
        [ -x "$DEST/bin/$tool" ] || return 1
    done
    [ -x "$DEST/cli-plugins/docker-buildx" ]
}

if complete; then
    echo "docker-tools: up to date in $DEST ($(tail -n +2 "$DEST/VERSIONS" | paste -sd" "))"
    exit 0
fi

case "$(dpkg --print-architecture)" in
    amd64 | arm64) ARCH="$(dpkg --print-architecture)" ;;
    *) echo "docker-tools: unsupported architecture $(dpkg --print-architecture) (amd64, arm64)" >&2; exit 1 ;;
esac
if [ ! -r "$KEYRING" ]; then
    echo "docker-tools: $KEYRING is missing: apt-get install debian-archive-keyring" >&2
    exit 1
fi
if command -v gpg >/dev/null \
    && ! gpg --batch --no-default-keyring --keyring "$KEYRING" --list-keys "$TRIXIE_KEY" >/dev/null 2>&1; then
    echo "docker-tools: $KEYRING lacks the trixie release key: apt-get install -t bookworm debian-archive-keyring (2023.3+deb12u2 or later)" >&2
    exit 1
fi

mkdir -p "$DEST"
exec 9>"$DEST/.lock"
flock 9  # two setups at once would unpack over each other
if complete; then exit 0; fi

APTDIR="$DEST/apt"
rm -rf "$APTDIR" "$DEST/debs" "$DEST/root.new"
mkdir -p "$APTDIR"/{etc/sources.list.d,etc/preferences.d,lists/partial,cache/archives/partial} \
    "$DEST/debs" "$DEST/root.new"
: >"$APTDIR/status"
: >"$APTDIR/etc/sources.list"
for suite in "${SUITES[@]}"; do
    echo "deb [arch=$ARCH signed-by=$KEYRING] $suite" >>"$APTDIR/etc/sources.list"
done
APT_OPTS=(
    -o "Dir::Etc::sourcelist=$APTDIR/etc/sources.list"
    -o "Dir::Etc::sourceparts=$APTDIR/etc/sources.list.d"
    -o "Dir::Etc::preferences=$APTDIR/etc/preferences"
    -o "Dir::Etc::preferencesparts=$APTDIR/etc/preferences.d"
    -o "Dir::State=$APTDIR"
    -o "Dir::State::status=$APTDIR/status"
    -o "Dir::Cache=$APTDIR/cache"
    -o "APT::Architecture=$ARCH"
    -o "APT::Architectures::=$ARCH"
    -o "APT::Sandbox::User=root"
    -o "Debug::NoLocking=1"
    -o "Acquire::Languages=none"
    -o "Acquire::Retries=3"
)
echo "docker-tools: reading trixie package lists (private apt configuration in $APTDIR)"
apt-get "${APT_OPTS[@]}" -qq update
(cd "$DEST/debs" && apt-get "${APT_OPTS[@]}" -qq download "${PACKAGES[@]}")

VERSIONS="$DEST/VERSIONS.new"
echo "$WANT" >"$VERSIONS"
for deb in "$DEST"/debs/*.deb; do
    dpkg-deb -x "$deb" "$DEST/root.new"
    dpkg-deb -f "$deb" Package Version | paste -sd' ' | sed 's/Package: //; s/ Version: /=/' >>"$VERSIONS"
done

rm -rf "$DEST/root" "$DEST/bin" "$DEST/cli-plugins"
mv "$DEST/root.new" "$DEST/root"
mkdir -p "$DEST/bin" "$DEST/cli-plugins"
# One folder for PATH; docker-init is tini-static (the --init of `docker run`).
for tool in usr/bin/docker usr/sbin/dockerd usr/sbin/docker-proxy usr/bin/containerd \
        usr/bin/containerd-shim-runc-v2 usr/bin/ctr usr/bin/docker-init usr/bin/tini-static \
        usr/bin/docker-registry; do
    ln -sfn "../root/$tool" "$DEST/bin/$(basename "$tool")"
done
ln -sfn ../root/usr/libexec/docker/cli-plugins/docker-buildx "$DEST/cli-plugins/docker-buildx"
"$DEST/bin/dockerd" --version >/dev/null  # it runs on this host's glibc
rm -rf "$DEST/debs" "$APTDIR"
mv "$VERSIONS" "$DEST/VERSIONS"
echo "docker-tools: unpacked into $DEST: $(tail -n +2 "$DEST/VERSIONS" | paste -sd" ")"
