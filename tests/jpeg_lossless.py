"""A minimal JPEG lossless (ITU T.81 process 14) encoder for the import tests.

pydicom 3.0 and its plugins decode JPEG lossless but none encodes it, and the tests must
build compressed copies of real CT slices themselves. One grey-level component, one
fixed Huffman table (every difference category gets a 5-bit code: valid, not optimal),
any of the seven predictors. The decoder under test (libjpeg, via pylibjpeg) is what
checks the stream.
"""

from __future__ import annotations

import struct

import numpy as np

_CATEGORIES = 17  # SSSS 0..16
_CODE_BITS = 5


def _predict(x: np.ndarray, precision: int, predictor: int) -> np.ndarray:
    """T.81 H.1.2.1 predictions: first row left, first column above, else Px."""
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    a, b, c = x[1:, :-1], x[:-1, 1:], x[:-1, :-1]
    pred[1:, 1:] = {
        1: a, 2: b, 3: c, 4: a + b - c, 5: a + ((b - c) >> 1), 6: b + ((a - c) >> 1),
        7: (a + b) >> 1,
    }[predictor]
    return pred


def encode(pixels: np.ndarray, precision: int = 16, predictor: int = 1) -> bytes:
    """JPEG lossless codestream of one 2-D frame of unsigned stored values.

    Args:
        pixels: (rows, columns) values in [0, 2**precision) (signed CT: its uint16 view).
        precision: sample precision P (2..16).
        predictor: selection value 1..7 (1 is the "SV1" transfer syntax).
    """
    rows, cols = pixels.shape
    x = pixels.astype(np.int64)
    diff = (x - _predict(x, precision, predictor)) % 65536  # T.81: modulo 2**16
    diff = np.where(diff >= 32768, diff - 65536, diff).ravel()
    size = np.zeros(diff.shape, np.int64)
    nonzero = diff != 0
    size[nonzero] = np.floor(np.log2(np.abs(diff[nonzero]))).astype(np.int64) + 1
    extra = np.where(diff < 0, diff + (1 << size) - 1, diff) & ((1 << size) - 1)
    extra = np.where(size == 16, 0, extra)  # category 16 (diff 32768) has no extra bits
    nbits = _CODE_BITS + np.where(size == 16, 0, size)
    value = (size << (nbits - _CODE_BITS)) | extra
    width = _CODE_BITS + 15
    bits = (value[:, None] >> np.arange(width - 1, -1, -1)) & 1
    keep = np.arange(width)[None, :] >= (width - nbits)[:, None]
    stream = bits[keep].astype(np.uint8)
    stream = np.concatenate([stream, np.ones((-len(stream)) % 8, np.uint8)])  # pad with 1s
    data = np.packbits(stream).tobytes().replace(b"\xff", b"\xff\x00")
    counts = [0] * 16
    counts[_CODE_BITS - 1] = _CATEGORIES
    dht = bytes([0x00, *counts, *range(_CATEGORIES)])
    out = b"\xff\xd8"
    out += b"\xff\xc3" + struct.pack(">HBHHBBBB", 11, precision, rows, cols, 1, 1, 0x11, 0)
    out += b"\xff\xc4" + struct.pack(">H", 2 + len(dht)) + dht
    out += b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, 1, 0x00, predictor, 0, 0)
    return out + data + b"\xff\xd9"
