# The edgepack builder: edgepack and every tool it drives, so a user on any OS can build bundles.
#   docker build -f Dockerfile.builder -t edgepack-builder .
#   docker run --rm -v "$PWD:/work" -w /work edgepack-builder build model.onnx --target rpi4
# Trying arm64 bundles (`edgepack run`) additionally needs --privileged for binfmt_misc and podman.
FROM debian:bookworm-slim

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EDGEPACK_CACHE_DIR=/cache

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates debian-archive-keyring gpgv \
      skopeo umoci podman runc qemu-user-static binfmt-support fuse-overlayfs uidmap \
      gcc-arm-none-eabi binutils-arm-none-eabi libnewlib-arm-none-eabi gcc g++ make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/edgepack
COPY pyproject.toml README.md ./
COPY packager ./packager
COPY templates ./templates
COPY targets ./targets
RUN python3 -m venv /opt/edgepack/venv \
 && /opt/edgepack/venv/bin/pip install --upgrade pip \
 && /opt/edgepack/venv/bin/pip install '.[mcu]'

ENV PATH=/opt/edgepack/venv/bin:$PATH
VOLUME ["/cache"]
ENTRYPOINT ["edgepack"]
CMD ["--help"]
