"""The Jetson backend's ``device`` section of ``manifest.json`` (:class:`JetsonSection`), typed
here because only this device class knows its shape (core keeps it as free-form JSON:
:meth:`packager.bundle.manifest.Manifest.device_as` parses it with this model).

What :meth:`packager.backends.jetson.backend.JetsonBackend.device_section` writes, read back
strictly: every key known, every value in the form the device side accepts (the engine key as
packager/runtime/engine_key.py checks it, L4T releases as jetson_preflight.py parses them), and
the parts consistent with each other (the key's TensorRT and SM are the section's, the plan path
is the key's, the L4T release lies in its range). A hand-edited section is one VerifyError (exit
8) naming ``device.FIELD``, never a KeyError deeper in verify, ``engine build`` or OTA publish.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from packager.bundle.manifest import DeviceSection, Sha256, Str
from packager.runtime.engine_key import (
    ENGINES_DIR,
    MAX_DLA_CORE,
    MAX_WORKSPACE_MIB,
    EngineKey,
)
from packager.runtime.jetson_preflight import parse_version

# An L4T release as the target file and the preflight write it (r36.3.0; no leading zeros, so
# the preflight's parse_version reads it).
L4tRelease = Annotated[
    str, Field(strict=True, pattern=r"^r[1-9][0-9]\.(0|[1-9][0-9]?)\.(0|[1-9][0-9]?)$")
]
# major.minor.patch as the engine key holds it (engine_key._RELEASE).
TrtRelease = Annotated[
    str,
    Field(strict=True, pattern=r"^(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})$"),
]
VersionNumber = Annotated[str, Field(strict=True, pattern=r"^r?[0-9]{1,4}(\.[0-9]{1,4}){0,3}$")]
Sm = Annotated[int, Field(strict=True, ge=10, le=999)]
TIMING_CACHE = "engine/timing.cache"


class EngineKeySection(DeviceSection):
    """``device.engine_key``: packager.runtime.engine_key.EngineKey as JSON."""

    model_sha256: Sha256
    tensorrt: TrtRelease
    sm: Sm
    precision: Literal["fp16", "int8", "fp32"]
    dla_core: Annotated[int, Field(strict=True, ge=0, le=MAX_DLA_CORE)] | None
    workspace_mib: Annotated[int, Field(strict=True, ge=1, le=MAX_WORKSPACE_MIB)]

    @model_validator(mode="after")
    def _a_key(self) -> EngineKeySection:
        self.key()  # the rules across fields (DLA runs fp16/int8 only): EngineKeyError
        return self

    def key(self) -> EngineKey:
        return EngineKey(**self.model_dump())


class L4tSection(DeviceSection):
    """``device.l4t``: the release built for and the range the device may run (min inclusive,
    below exclusive)."""

    release: L4tRelease
    min: L4tRelease
    below: L4tRelease

    @model_validator(mode="after")
    def _in_range(self) -> L4tSection:
        low, release, below = (parse_version(v) for v in (self.min, self.release, self.below))
        if not low <= release < below:
            raise ValueError(
                f"l4t: release {self.release} is not in min {self.min} .. below {self.below}"
            )
        return self


class JetsonSection(DeviceSection):
    """``device`` of a Jetson bundle (JetsonBackend.device_section)."""

    serving: Literal["tensorrt", "onnxruntime-cpu"]
    fallback_reason: Str | None = None
    engine_key: EngineKeySection | None = None
    plan: Str | None = None
    timing_cache: Literal["engine/timing.cache"] | None = None
    l4t: L4tSection
    jetpack: VersionNumber
    tensorrt: TrtRelease
    cuda: VersionNumber
    sm: Sm
    generation: Literal["r32", "r35", "r36"]

    @model_validator(mode="after")
    def _consistent(self) -> JetsonSection:
        engine = self.serving == "tensorrt"
        if engine != (self.engine_key is not None) or engine != (self.plan is not None):
            raise ValueError(
                "engine_key and plan are set exactly when serving is 'tensorrt' "
                f"(serving {self.serving!r})"
            )
        if engine == (self.fallback_reason is not None):
            raise ValueError(
                "fallback_reason is set exactly when serving is 'onnxruntime-cpu' "
                f"(serving {self.serving!r})"
            )
        major = self.l4t.release[1:3]
        if self.generation != ("r32" if major == "32" else "r35" if major == "35" else "r36"):
            raise ValueError(f"generation {self.generation} is not L4T {self.l4t.release}'s")
        if self.engine_key is not None:
            if (self.engine_key.tensorrt, self.engine_key.sm) != (self.tensorrt, self.sm):
                raise ValueError(
                    f"engine_key's tensorrt {self.engine_key.tensorrt} / sm {self.engine_key.sm} "
                    f"are not the section's {self.tensorrt} / {self.sm}"
                )
            expected = self.engine_key.key().plan_path(ENGINES_DIR).as_posix()
            if self.plan != expected:
                raise ValueError(f"plan {self.plan!r} is not the key's path {expected}")
        return self
