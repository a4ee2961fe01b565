"""The registers a definition declares for one BAR, with their access kinds (pure data, no I/O)."""

from __future__ import annotations

import bisect
from typing import Sequence

from vfiofs.models.spec import Register


class RegisterFile:
    """The registers of one BAR with their access kinds (ro, rw, wo, w1c, rc)."""

    def __init__(self, registers: Sequence[Register]) -> None:
        self.registers = sorted(registers, key=lambda r: r.offset)
        self._starts = [r.offset for r in self.registers]
        self._max_width = max((r.width for r in self.registers), default=0)
        self.values: dict[int, int] = {}
        self.reset()

    def reset(self) -> None:
        self.values = {r.offset: r.reset for r in self.registers}

    def overlapping(self, offset: int, size: int) -> list[Register]:
        if not self.registers:
            return []
        first = bisect.bisect_left(self._starts, offset - self._max_width + 1)
        end = bisect.bisect_left(self._starts, offset + size)
        return [r for r in self.registers[first:end] if r.offset + r.width > offset]

    def overlay_read(self, offset: int, data: bytearray) -> None:
        """Replace the bytes of ``data`` (read at ``offset``) that registers cover."""
        for reg in self.overlapping(offset, len(data)):
            value = 0 if reg.access == "wo" else self.values[reg.offset]
            raw = value.to_bytes(reg.width, "little")
            lo, hi = max(offset, reg.offset), min(offset + len(data), reg.offset + reg.width)
            data[lo - offset : hi - offset] = raw[lo - reg.offset : hi - reg.offset]
            if reg.access == "rc":
                self.values[reg.offset] = 0

    def apply_write(self, offset: int, data: bytes) -> None:
        for reg in self.overlapping(offset, len(data)):
            lo, hi = max(offset, reg.offset), min(offset + len(data), reg.offset + reg.width)
            shift = 8 * (lo - reg.offset)
            mask = ((1 << (8 * (hi - lo))) - 1) << shift
            value = int.from_bytes(data[lo - offset : hi - offset], "little") << shift
            current = self.values[reg.offset]
            if reg.access in ("rw", "wo"):
                self.values[reg.offset] = (current & ~mask) | value
            elif reg.access == "w1c":
                self.values[reg.offset] = current & ~value
