#!/usr/bin/env python3
"""Writes small 8-bit grey PNG images for the Slurm test: DIR/site-X/img-NN.png, sites that
differ in intensity scale and offset (Python's standard library only: zlib, struct)."""
import random
import struct
import sys
import zlib


def png(path, w, h, pixels):
    raw = b"".join(b"\x00" + bytes(pixels[y * w:(y + 1) * w]) for y in range(h))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw)))
        f.write(chunk(b"IEND", b""))


def main():
    import os
    out, per_site = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
    rng = random.Random(13)
    sites = {"site-A": (20, 120), "site-B": (60, 180), "site-C": (5, 90), "site-D": (40, 200)}
    w, h = 48, 40
    for site, (offset, scale) in sites.items():
        os.makedirs(os.path.join(out, site), exist_ok=True)
        for n in range(per_site):
            px = []
            for y in range(h):
                for x in range(w):
                    v = offset + scale * (0.6 * (x + y) / (w + h) + 0.25 * rng.random())
                    px.append(max(0, min(255, int(round(v)))))
            png(os.path.join(out, site, "img-%02d.png" % n), w, h, px)


if __name__ == "__main__":
    main()
