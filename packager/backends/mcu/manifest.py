"""The MCU backend's ``device`` section of ``manifest.json`` (:class:`McuSection`), typed here
because only this device class knows its shape (core keeps it as free-form JSON:
:meth:`packager.bundle.manifest.Manifest.device_as` parses it with this model)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, JsonValue

from packager.bundle.manifest import Count, DeviceSection, Str

Address = Annotated[str, Field(strict=True, pattern=r"^0x[0-9a-f]{8}$")]


class UpdateSlots(DeviceSection):
    """The A/B model slots in flash (packager.backends.mcu.backend.flash_map), addresses as
    ``0x%08x``; ``slot_a_image``: the file to flash at ``slot_a_addr``."""

    slot_bytes: Count
    header_area_bytes: Count
    slot_a_addr: Address
    slot_b_addr: Address
    firmware_limit_addr: Address
    slot_a_image: Str
    slot_a_model_version: Count


class McuSection(DeviceSection):
    """``McuProject.summary()`` plus ``proof`` (the firmware's proof before flash:
    ``{"emulated": false, "note": ...}`` or the emulated run's figures)."""

    engine: Str
    sdk: Str
    arena_measured_bytes: Count
    arena_margin_percent: Count
    arena_bytes: Count
    ops: tuple[Str, ...]
    model_sha256: Annotated[str, Field(strict=True, pattern=r"^[0-9a-f]{64}$")]
    update_slot_bytes: Count
    update_slots: UpdateSlots | None = None
    proof: dict[str, JsonValue]
