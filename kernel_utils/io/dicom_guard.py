"""Whether a DICOM file is whole enough for a native reader (dicomsdl) that cannot be trusted with bad bytes.

dicomsdl segfaults on an uncompressed file cut inside its Pixel Data: a native crash cannot be caught, and it
takes a worker pool or a Kaggle kernel down with it. Before a file goes to it, the first few kilobytes are read
and the Pixel Data element's declared length is checked against the file's size (and an encapsulated one for its
closing delimiter). A file that fails goes to pydicom, which reads it in Python and names what is wrong.
"""

from __future__ import annotations

import os
import struct

PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0: the end of encapsulated frames
UNDEFINED_LENGTH = 0xFFFFFFFF
HEAD_BYTES = 4096  # the competition's headers end at about 750 bytes
LONG_HEAD_BYTES = 65536
TAIL_BYTES = 64


def pixel_data_extent(head: bytes) -> tuple[int, int] | None:
    """(offset of the pixel bytes, declared length) of the first Pixel Data element in `head`, or None.

    Explicit VR (OB/OW, 12-byte element header) and implicit VR (8 bytes) are both recognised; the length is
    UNDEFINED_LENGTH for encapsulated (compressed) frames.
    """
    i = head.find(PIXEL_DATA_TAG)
    if i < 0 or i + 12 > len(head):
        return None
    if head[i + 4:i + 6] in (b"OB", b"OW"):
        return i + 12, struct.unpack_from("<I", head, i + 8)[0]
    return i + 8, struct.unpack_from("<I", head, i + 4)[0]


def checked_pixel_length(path: str | os.PathLike) -> int | None:
    """The Pixel Data length the header declares (UNDEFINED_LENGTH for compressed frames) when the file holds
    every byte of it, else None: a native reader may take the file only when this is not None.

    None for a cut file, a file whose Pixel Data element is not in its first LONG_HEAD_BYTES, an empty or non-DICOM
    file: those go to pydicom, which reads them safely or raises a clear error. Costs one small read (two for a
    compressed file or a long header), about 12 us a file here.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        extent = pixel_data_extent(os.pread(fd, HEAD_BYTES, 0))
        if extent is None and size > HEAD_BYTES:
            extent = pixel_data_extent(os.pread(fd, LONG_HEAD_BYTES, 0))
        if extent is None:
            return None
        start, length = extent
        if length != UNDEFINED_LENGTH:
            return length if start + length <= size else None
        tail = os.pread(fd, TAIL_BYTES, max(size - TAIL_BYTES, start))
        return length if SEQUENCE_DELIMITER in tail else None
    except OSError:
        return None
    finally:
        os.close(fd)
