# The edgepack builder: edgepack and every tool it drives (apt-get, dpkg-deb, gpgv, skopeo,
# umoci, zstd, pip, podman, qemu-user, gcc/g++, the arm-none-eabi cross-compiler, ssh), on Debian
# bookworm, so that a user on any OS builds the bundles a bookworm host builds, byte for byte.
#
#   docker build -f Dockerfile.builder -t edgepack-builder .
#   docker run --rm -v "$PWD:/work" edgepack-builder build model.onnx --target rpi4
#
# Behind a TLS-intercepting proxy, hand the build your CA bundle as a secret (never a layer):
#   docker build -f Dockerfile.builder --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt ...
# and at run time mount it and point the tools at it:
#   docker run --rm -v "$PWD:/work" -v /etc/ssl/certs/ca-certificates.crt:/ca.crt:ro \
#     -e PIP_CERT=/ca.crt -e SSL_CERT_FILE=/ca.crt edgepack-builder build ...
# Keep the download and layer cache between runs with -v edgepack-cache:/cache. Trying arm64
# bundles (`edgepack run`) additionally needs --privileged (binfmt_misc, podman).
#
# No `# syntax=` line: the Dockerfile frontend built into BuildKit (Docker >= 23) reads the
# secret mount, and a syntax image would need Docker Hub. The base can be made without a
# registry: mmdebstrap --variant=minbase bookworm - | docker import - debian:bookworm-slim
FROM debian:bookworm-slim

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EDGEPACK_CACHE_DIR=/cache \
    LANG=C.UTF-8

# apt speaks plain HTTP to deb.debian.org (its signatures are what it trusts): no CA needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates debian-archive-keyring gpgv zstd \
      skopeo umoci podman runc qemu-user-static binfmt-support fuse-overlayfs uidmap \
      gcc-arm-none-eabi binutils-arm-none-eabi libnewlib-arm-none-eabi gcc g++ make \
      openssh-client \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/edgepack
COPY pyproject.toml README.md ./
COPY packager ./packager
COPY templates ./templates
COPY targets ./targets
# The optional CA bundle reaches pip only while this step runs (/run/secrets is a tmpfs).
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 -m venv /opt/edgepack/venv \
 && /opt/edgepack/venv/bin/pip install --no-compile '.[mcu]' \
 && rm -rf /opt/edgepack/packager /opt/edgepack/build

ENV PATH=/opt/edgepack/venv/bin:$PATH
VOLUME ["/cache"]
WORKDIR /work
ENTRYPOINT ["edgepack"]
CMD ["--help"]
