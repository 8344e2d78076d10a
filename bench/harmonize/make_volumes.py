#!/usr/bin/python3
"""Writes N synthetic 128^3 int16 NIfTI-1 volumes in S site folders (benchmark input, not a test
fixture). Each site has its own intensity scale, offset and smooth bias field, so harmonizers
have site statistics to fit. Seeded: the same arguments give the same files."""
import os
import struct
import sys

import numpy as np


def nifti1_header(shape, spacing, dtype_code=4, bitpix=16):
    h = bytearray(348)
    struct.pack_into("<i", h, 0, 348)
    dims = [3, *shape, 1, 1, 1, 1]
    struct.pack_into("<8h", h, 40, *dims)
    struct.pack_into("<h", h, 70, dtype_code)  # NIFTI_TYPE_INT16
    struct.pack_into("<h", h, 72, bitpix)
    struct.pack_into("<8f", h, 76, 1.0, *spacing, 0, 0, 0, 0)
    struct.pack_into("<f", h, 108, 352.0)  # vox_offset
    struct.pack_into("<f", h, 112, 1.0)  # scl_slope
    struct.pack_into("<h", h, 254, 1)  # sform_code: scanner
    struct.pack_into("<4f", h, 280, spacing[0], 0, 0, -64.0)
    struct.pack_into("<4f", h, 296, 0, spacing[1], 0, -64.0)
    struct.pack_into("<4f", h, 312, 0, 0, spacing[2], -64.0)
    h[344:348] = b"n+1\0"
    return bytes(h) + b"\0" * 4


def main():
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    sites = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    rng = np.random.default_rng(2024)
    z, y, x = np.mgrid[0:size, 0:size, 0:size].astype(np.float32) / size - 0.5
    r = np.sqrt(x * x + y * y + z * z)
    anatomy = (r < 0.42) * (600 + 300 * np.cos(9 * x) * np.cos(7 * y)) + (r < 0.2) * 400
    for i in range(n):
        site = i % sites
        d = os.path.join(out, f"site{site}")
        os.makedirs(d, exist_ok=True)
        f = os.path.join(d, f"vol{i:04d}.nii")
        if os.path.exists(f):
            continue
        scale, offset = 0.6 + 0.3 * site, 40 * site
        bias = 1 + 0.25 * site * x + 0.1 * y
        v = anatomy * scale * bias + offset + rng.normal(0, 15, anatomy.shape)
        v = np.clip(np.rint(v), -32768, 32767).astype("<i2")
        with open(f + ".tmp", "wb") as fh:
            fh.write(nifti1_header((size, size, size), (1.0, 1.0, 1.2)))
            fh.write(v.tobytes(order="C"))  # x fastest: numpy's last axis is x
        os.replace(f + ".tmp", f)


if __name__ == "__main__":
    main()
