# edgepack: `make demo` builds and tries a bundle of the shipped example model;
# `make test` runs the whole test suite. Both do all set-up on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := python3 python3-venv python3-dev gcc g++ make curl ca-certificates \
	debian-archive-keyring podman skopeo umoci runc qemu-user-static binfmt-support uidmap \
	fuse-overlayfs slirp4netns gcc-arm-none-eabi binutils-arm-none-eabi libnewlib-arm-none-eabi \
	mmdebstrap arch-test libstdc++-arm-none-eabi-newlib qemu-system-arm cmake ninja-build \
	bubblewrap openssh-server openssh-client
DEMO_TARGET ?= rpi4
DEMO_OUT ?= demo-out/mnist-$(DEMO_TARGET)

.PHONY: setup apt venv binfmt docker-tools demo test lint typecheck bench clean

setup: apt venv binfmt docker-tools

apt: .setup-apt.stamp
.setup-apt.stamp:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES)
	touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(VENV)/bin/pip install -q -e '.[test,optimize,mcu,mcu-convert]'
	touch $@

# qemu-user for foreign-architecture images (edgepack run, tests); binfmt_misc is not mounted
# at boot in containers and CI sandboxes. Needs root.
binfmt:
	@if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then \
		$(SUDO) mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; fi
	@if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then \
		grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf | $(SUDO) tee /proc/sys/fs/binfmt_misc/register >/dev/null; fi
	@echo "binfmt: qemu-aarch64 $$(head -1 /proc/sys/fs/binfmt_misc/qemu-aarch64)"

# Debian trixie's Docker engine, containerd, buildx and tini, unpacked (never installed) into
# .ci/docker-tools through a private apt configuration, for the tests that drive a private dockerd.
# Fast when already done.
docker-tools: | apt
	.ci/docker-tools.sh

demo: setup
	$(VENV)/bin/edgepack inspect tests/data/mnist.onnx
	$(VENV)/bin/edgepack build tests/data/mnist.onnx --target $(DEMO_TARGET) --out $(DEMO_OUT) --version 1.0.0
	$(VENV)/bin/edgepack verify $(DEMO_OUT)
	$(VENV)/bin/edgepack run $(DEMO_OUT) --port 18080 --smoke-test

test: setup
	$(VENV)/bin/ruff check packager tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -p no:cacheprovider

lint:
	$(VENV)/bin/ruff check packager tests benchmarks

typecheck:
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/python benchmarks/build.py

clean:
	rm -rf demo-out .pytest_cache .mypy_cache .ruff_cache
