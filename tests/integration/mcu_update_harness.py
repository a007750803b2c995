"""ctypes harness for the generated model-update stub: simulated flash with power cuts."""

from __future__ import annotations

import ctypes
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

READ_FN = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32
)
WRITE_FN = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32
)

EP_OK = 0
EP_ERR_LENGTH = -4
EP_ERR_OFFSET = -5
EP_ERR_CRC = -6
EP_ERR_HASH = -7
EP_ERR_NO_MODEL = -8


class Config(ctypes.Structure):
    _fields_ = [
        ("read", READ_FN),
        ("write", WRITE_FN),
        ("user", ctypes.c_void_p),
        ("slot_addr", ctypes.c_uint32 * 2),
        ("slot_size", ctypes.c_uint32),
        ("header_area", ctypes.c_uint32),
    ]


@dataclass
class Flash:
    """A byte array with a power switch: after ``cut_after`` writes every write is lost, and
    the write that hits the cut can be torn (only its first half lands)."""

    size: int
    cut_after: int | None = None
    torn: bool = False
    writes: int = 0
    data: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.data = bytearray(b"\xff" * self.size)

    def read(self, _user: int, addr: int, dst: int, length: int) -> int:
        if addr + length > self.size:
            return -1
        ctypes.memmove(dst, bytes(self.data[addr : addr + length]), length)
        return 0

    def write(self, _user: int, addr: int, src: int, length: int) -> int:
        if addr + length > self.size:
            return -1
        if self.cut_after is not None and self.writes >= self.cut_after:
            return -1  # power is gone: nothing reaches the flash
        self.writes += 1
        payload = ctypes.string_at(src, length)
        if self.cut_after is not None and self.writes == self.cut_after and self.torn:
            payload = payload[: length // 2]
        self.data[addr : addr + len(payload)] = payload
        return 0


class Stub:
    """One device boot: a context over ``flash`` using the shared library ``lib``."""

    SLOT_SIZE = 8192
    HEADER_AREA = 256

    def __init__(
        self,
        lib: ctypes.CDLL,
        flash: Flash,
        *,
        slot_addr: tuple[int, int] | None = None,
        slot_size: int | None = None,
        header_area: int | None = None,
    ) -> None:
        self.lib = lib
        self.flash = flash
        self.slot_size = self.SLOT_SIZE if slot_size is None else slot_size
        self.header_area = self.HEADER_AREA if header_area is None else header_area
        self.slot_addr = (0, self.slot_size) if slot_addr is None else slot_addr
        self._read = READ_FN(flash.read)  # kept referenced for the lifetime of the context
        self._write = WRITE_FN(flash.write)
        self.config = Config(
            self._read,
            self._write,
            None,
            (ctypes.c_uint32 * 2)(*self.slot_addr),
            self.slot_size,
            self.header_area,
        )
        self.ctx = ctypes.create_string_buffer(lib.ep_update_ctx_size())
        self.boot_result = lib.ep_update_init(self.ctx, ctypes.byref(self.config))

    def active(self) -> int:
        return int(self.lib.ep_update_active_slot(self.ctx))

    def verify(self, slot: int) -> int:
        return int(self.lib.ep_update_verify_slot(self.ctx, slot, None))

    def slot_bytes(self, slot: int, length: int) -> bytes:
        start = self.slot_addr[slot]
        return bytes(self.flash.data[start : start + length])

    def header(self, slot: int) -> bytes:
        """The 64 committed header bytes at the start of ``slot``'s header area."""
        start = self.slot_addr[slot] + self.slot_size - self.header_area
        return bytes(self.flash.data[start : start + 64])

    def update(
        self,
        model: bytes,
        version: int,
        *,
        chunk: int = 256,
        length: int | None = None,
        crc: int | None = None,
        sha: bytes | None = None,
        corrupt_chunk: int | None = None,
    ) -> int:
        """Run begin/write.../finish; return the first non-OK code or finish()'s result."""
        length = len(model) if length is None else length
        crc = zlib.crc32(model) if crc is None else crc
        digest = hashlib.sha256(model).digest() if sha is None else sha
        rc = int(self.lib.ep_update_begin(self.ctx, version, length, crc, digest))
        if rc != EP_OK:
            return rc
        for n, offset in enumerate(range(0, len(model), chunk)):
            piece = bytearray(model[offset : offset + chunk])
            if corrupt_chunk == n:
                piece[0] ^= 0x5A
            rc = int(self.lib.ep_update_write(self.ctx, offset, bytes(piece), len(piece)))
            if rc != EP_OK:
                return rc
        return int(self.lib.ep_update_finish(self.ctx))


def load_stub(library: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library))
    lib.ep_update_ctx_size.restype = ctypes.c_size_t
    lib.ep_update_init.argtypes = [ctypes.c_void_p, ctypes.POINTER(Config)]
    lib.ep_update_active_slot.argtypes = [ctypes.c_void_p]
    lib.ep_update_verify_slot.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.ep_update_begin.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_uint32,
        ctypes.c_uint32,
        ctypes.c_char_p,
    ]
    lib.ep_update_write.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_char_p,
        ctypes.c_uint32,
    ]
    lib.ep_update_finish.argtypes = [ctypes.c_void_p]
    lib.ep_update_reject_active.argtypes = [ctypes.c_void_p]
    lib.ep_crc32.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]
    lib.ep_crc32.restype = ctypes.c_uint32
    return lib
