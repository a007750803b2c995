"""The Linux fit: memory (model + runtime) and storage (image installed twice + image.tar)."""

from __future__ import annotations

from packager.fit import MIB, FitReport, Resource
from packager.models.info import ModelInfo
from packager.targets import JetsonTarget, LinuxTarget, LoadedTarget

# Unpacked size of the Debian base plus the onnxruntime/numpy wheels (measured on the arm64 image,
# rounded up); the model comes on top. Used before the image exists.
LINUX_IMAGE_BASE_BYTES = 160 * MIB


def linux_fit(model: ModelInfo, target: LoadedTarget) -> FitReport:
    """Peak memory and storage of a containerised onnxruntime runtime on a Linux device."""
    spec = target.spec
    assert isinstance(spec, LinuxTarget | JetsonTarget)
    overhead = spec.runtime.overhead_mb * MIB
    memory_needed = (
        ("weights", model.weights_bytes),
        ("activations", model.activation_bytes),
        ("runtime", overhead),
    )
    ram = spec.memory.ram_mb * MIB
    reserved = spec.memory.reserved_mb * MIB
    available = ram - reserved
    note = f"{spec.memory.ram_mb} MB RAM - {spec.memory.reserved_mb} MB reserved"
    if spec.service.memory_max_mb is not None and spec.service.memory_max_mb * MIB < available:
        available = spec.service.memory_max_mb * MIB
        note = f"service.memory_max_mb = {spec.service.memory_max_mb}"
    memory = Resource(
        name="memory",
        needed_bytes=sum(v for _, v in memory_needed),
        available_bytes=max(available, 0),
        needed_parts=memory_needed,
        available_note=note,
        estimate_source="weights from the model's initializers; activations: peak of live "
        "intermediate tensors with dynamic dims as 1; runtime: target runtime.overhead_mb",
    )
    # The image lives twice on the device: the loaded image in the engine's store and the
    # previous version kept for rollback; the bundle's image.tar comes on top while installing.
    image = LINUX_IMAGE_BASE_BYTES + model.size_bytes
    storage = storage_resource(
        target, image, image, "base image + wheels (measured, rounded up) + model"
    )
    return FitReport(target=target.name, resources=(memory, storage))


# The image lives twice once installed: the running version and the previous one for rollback.
INSTALLED_COPIES = 2


def storage_available(target: LoadedTarget) -> tuple[int, str]:
    """(bytes, how they were computed) of a Linux target's storage that images may use."""
    spec = target.spec
    assert isinstance(spec, LinuxTarget | JetsonTarget)
    available = max((spec.storage.size_mb - spec.storage.reserved_mb) * MIB, 0)
    note = f"{spec.storage.size_mb} MB {spec.storage.kind} - {spec.storage.reserved_mb} MB reserved"
    return available, note


def storage_resource(
    target: LoadedTarget, installed_bytes: int, archive_bytes: int, source: str
) -> Resource:
    """The storage a Linux bundle needs: the installed image twice (running version and the
    previous one kept for rollback) plus the bundle's image.tar while installing, in bytes."""
    available, note = storage_available(target)
    parts = (
        ("image (installed)", installed_bytes),
        ("previous version", installed_bytes),
        ("image.tar", archive_bytes),
    )
    return Resource(
        name="storage",
        needed_bytes=sum(v for _, v in parts),
        available_bytes=available,
        needed_parts=parts,
        available_note=note,
        estimate_source=source,
    )


def with_image_storage(
    report: FitReport, target: LoadedTarget, unpacked_bytes: int, archive_bytes: int
) -> FitReport:
    """``report`` with its storage estimate replaced by the built image's real sizes: every
    layer's uncompressed tar (a base archive's layers included), installed twice, plus the
    bundle's image.tar."""
    storage = storage_resource(
        target, unpacked_bytes, archive_bytes,
        "the built image: uncompressed size of every layer, and the archive",
    )
    resources = tuple(storage if r.name == "storage" else r for r in report.resources)
    return FitReport(target=report.target, resources=resources)
