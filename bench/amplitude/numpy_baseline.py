#!/usr/bin/python3
"""Plain numpy implementation of amplitude normalize, the benchmark's baseline.

Same operation as the plugin (README.md): A' = (1-lam) A + lam N a_ref inside the centred
low-frequency band |k_d| <= b, phase kept, written the way one would in numpy (rfftn/irfftn).
Prints "<label>_numpy <images per second>" lines. Usage: numpy_baseline.py [seconds] [beta]
"""
import math
import sys
import time

import numpy as np


def make_image(rng, shape, gain, offset):
    idx = np.indices(shape)
    x, y = idx[-1], idx[-2]
    return (offset + gain * (np.sin(0.05 * x) + np.cos(0.07 * y) + rng.random(shape))).astype(
        np.float32)


def band_mask(shape, b):
    """|k_d| <= b on the rfftn half layout (last axis holds k >= 0 only)."""
    mask = np.ones(shape[:-1] + (shape[-1] // 2 + 1,), dtype=bool)
    for axis, n in enumerate(shape[:-1]):
        k = np.abs(np.rint(np.fft.fftfreq(n) * n))
        view = [1] * len(shape)
        view[axis] = n
        mask &= (k <= b).reshape(view)
    view = [1] * (len(shape) - 1) + [shape[-1] // 2 + 1]
    mask &= (np.arange(shape[-1] // 2 + 1) <= b).reshape(view)
    return mask


def normalize(x, ref, mask, lam):
    X = np.fft.rfftn(x)
    A = np.abs(X)
    A2 = np.where(mask, (1 - lam) * A + lam * ref, A)
    return np.fft.irfftn(A2 * np.exp(1j * np.angle(X)), s=x.shape).astype(np.float32)


def run(label, shape, seconds, beta):
    rng = np.random.default_rng(1)
    sites = [[make_image(rng, shape, 20 + 30 * s, 100) for _ in range(2)] for s in range(2)]
    n = np.prod(shape)
    means = [np.mean([np.abs(np.fft.rfftn(im)) / n for im in s], axis=0) for s in sites]
    ref = (2 * means[0] + 2 * means[1]) / 4 * n
    sizes = [m for m in shape if m > 1]
    b = max(shape) // 2 if beta >= 1 else math.floor(min(sizes) * beta)  # 1: whole spectrum
    mask = band_mask(shape, b)
    image = make_image(rng, shape, 20, 100)
    normalize(image, ref, mask, 1.0)  # warm-up
    best = 0.0
    for _ in range(3):
        count, t0 = 0, time.perf_counter()
        while True:
            image = normalize(image, ref, mask, 1.0)
            count += 1
            dt = time.perf_counter() - t0
            if dt >= seconds:
                break
        best = max(best, count / dt)
    print(f"{label}_numpy {best:.3f}", flush=True)


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
    beta = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    run("2d_256", (256, 256), seconds, beta)
    run("3d_128", (128, 128, 128), seconds * 4, beta)


if __name__ == "__main__":
    main()
