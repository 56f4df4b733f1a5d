"""JPEG headers read without decoding: the frame header (size, components, baseline or progressive).

The nvjpeg backend reads it to send a file that GPU decoding cannot take to the CPU; the DALI backend reads each
image's size from it (its crop is drawn on the CPU). Reading a header touches a few hundred bytes, not the image.
"""

from __future__ import annotations

from typing import NamedTuple

# JPEG start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC): the segment holding the size and components.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length: TEM and RST0-RST7.
_BARE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])


class JpegFrame(NamedTuple):
    """A JPEG's frame header: its SOF marker (0xC0 baseline, 0xC2 progressive, ...) and what it declares."""

    marker: int
    precision: int
    height: int
    width: int
    components: int


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame header of the JPEG file content ``data`` (bytes), or None when it is not a JPEG or cut short.

    Walks the marker segments from the start of the file to the first start-of-frame, skipping the others
    by their length, so it reads a few hundred bytes, not the image.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF or marker in _BARE_MARKERS:
            # A fill byte, or a marker without a segment.
            i += 1 if marker == 0xFF else 2
            continue
        if marker in (0xD9, 0xDA):
            # End of image or start of scan before any frame: not a valid JPEG.
            return None
        if marker in _SOF_MARKERS:
            if i + 10 > n:
                return None
            frame = JpegFrame(marker, data[i + 4], int.from_bytes(data[i + 5 : i + 7], "big"),
                              int.from_bytes(data[i + 7 : i + 9], "big"), data[i + 9])
            # A height of 0 is declared later (DNL marker): the size is then unknown here.
            return frame if frame.height and frame.width else None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None
