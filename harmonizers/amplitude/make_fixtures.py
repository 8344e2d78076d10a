#!/usr/bin/python3
"""Reference outputs of the amplitude harmonizer, computed independently in float64 numpy.

Run from anywhere: /usr/bin/python3 harmonizers/amplitude/make_fixtures.py
Writes harmonizers/amplitude/fixtures/<case>/: site images (A_*.npy, B_*.npy), target.npy,
expected.npy (float64) and params.txt. Arrays are (channels, nz, ny, nx), nz = 1 for 2D.

Unlike the plugin (r2c half spectra, float32), this uses the full complex spectrum (fftn) in
float64 and the textbook definitions of README.md, so it checks the half-layout bookkeeping.
"""
import math
import os
import shutil

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")


def band_halfwidth(shape, beta):
    sizes = [n for n in shape if n > 1]
    if beta >= 1:  # the whole spectrum, whatever the aspect ratio
        return max(shape) // 2
    return math.floor(min(sizes) * beta) if sizes else 0


def band_mask(shape, b, ref_shape):
    """|k_d| <= min(b, n_ref_d // 2) for every axis, k_d the signed frequency (numpy.fft.fftfreq)."""
    mask = np.ones(shape, dtype=bool)
    for axis, (n, nr) in enumerate(zip(shape, ref_shape)):
        k = np.rint(np.fft.fftfreq(n) * n).astype(int)
        view = [1] * len(shape)
        view[axis] = n
        mask &= (np.abs(k) <= min(b, nr // 2)).reshape(view)
    return mask


def amplitude(img):
    """Per-voxel amplitude |X(k)| / N of each channel: (C, nz, ny, nx)."""
    n = img[0].size
    return np.abs(np.fft.fftn(img.astype(np.float64), axes=(1, 2, 3))) / n


def resample(spec, shape):
    """Bin k to bin k (cycles per image), axis by axis; 0 above the source's |k| <= n // 2; an
    even target's Nyquist bin averages the source's +k and -k."""
    out = spec
    for axis, nt in zip((1, 2, 3), shape):
        ns = out.shape[axis]
        if ns == nt:
            continue
        k = np.rint(np.fft.fftfreq(nt) * nt).astype(int)
        a = np.take(out, k % ns, axis=axis)
        if nt % 2 == 0 and nt // 2 <= (ns - 1) // 2:
            # an even target's Nyquist bin stands for +k and -k: the mean of the source's two
            idx = [slice(None)] * 4
            idx[axis] = nt // 2
            a[tuple(idx)] = 0.5 * (np.take(out, nt // 2, axis=axis) + np.take(out, -(nt // 2) % ns, axis=axis))
        view = [1, 1, 1, 1]
        view[axis] = nt
        out = a * (np.abs(k) <= ns // 2).reshape(view)
    return out


def smallest(shapes):
    return tuple(min(s[d] for s in shapes) for d in range(3))


def site_mean(images):
    """Mean per-voxel amplitude on the site's grid: the smallest size per axis of its shapes."""
    groups = {}
    order = []
    for im in images:
        key = im.shape[1:]
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(amplitude(im))
    best = smallest(order)
    total = sum(len(v) for v in groups.values())
    acc = 0
    for key in order:
        acc = acc + len(groups[key]) * resample(np.mean(groups[key], axis=0), best)
    return acc / total, total


def combine(parts):
    """Sample-weighted mean on the smallest size per axis over the parts."""
    grid = smallest([p[0].shape[1:] for p in parts])
    total = sum(w for _, w in parts)
    return sum(w * resample(s, grid) for s, w in parts) / total, grid


def harmonize(img, ref, beta, lam, clip):
    """A' = (1-lam) A + lam N a_ref inside the band; phase kept (angle 0 where A = 0)."""
    x = img.astype(np.float64)
    shape = x.shape[1:]
    n = x[0].size
    X = np.fft.fftn(x, axes=(1, 2, 3))
    A = np.abs(X)
    R = resample(ref, shape) * n
    ref_shape = ref.shape[1:]  # the band is in cycles per image, from the reference's grid
    mask = band_mask(shape, band_halfwidth(ref_shape, beta), ref_shape)[None]
    A2 = np.where(mask, (1 - lam) * A + lam * R, A)
    y = np.real(np.fft.ifftn(A2 * np.exp(1j * np.angle(X)), axes=(1, 2, 3)))
    if clip == "nonnegative":
        y = np.maximum(y, 0)
    elif clip == "input":
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        hi = x.max(axis=(1, 2, 3), keepdims=True)
        y = np.clip(y, lo, hi)
    return y


def make_image(rng, channels, shape, gain, offset, smooth):
    """Structured test image: a smooth field plus texture, with a site-specific 'style'."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    out = []
    for _ in range(channels):
        f = rng.uniform(0.5, 2.0, size=3)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        field = (
            np.sin(2 * np.pi * f[0] * x / nx + phase[0])
            + np.cos(2 * np.pi * f[1] * y / ny + phase[1])
            + 0.5 * np.sin(2 * np.pi * f[2] * z / max(nz, 1) + phase[2])
        )
        tex = rng.normal(size=shape)
        out.append(offset + gain * (smooth * field + tex))
    return np.asarray(out, dtype=np.float32)


def write_case(name, params, site_a, site_b, target, expected):
    d = os.path.join(OUT, name)
    os.makedirs(d)
    for i, im in enumerate(site_a):
        np.save(os.path.join(d, f"A_{i}.npy"), im)
    for i, im in enumerate(site_b):
        np.save(os.path.join(d, f"B_{i}.npy"), im)
    np.save(os.path.join(d, "target.npy"), target)
    np.save(os.path.join(d, "expected.npy"), np.ascontiguousarray(expected, dtype=np.float64))
    with open(os.path.join(d, "params.txt"), "w") as f:
        for k, v in params.items():
            f.write(f"{k}={v}\n")


def case(rng, name, dim, channels, shapes_a, shapes_b, target_shape, mode, beta, lam, clip,
         reference="B"):
    site_a = [make_image(rng, channels, s, 20.0, 100.0, 2.0) for s in shapes_a]
    site_b = [make_image(rng, channels, s, 45.0, 30.0, 1.0) for s in shapes_b]
    target = make_image(rng, channels, target_shape, 20.0, 100.0, 2.0)
    ma, wa = site_mean(site_a)
    mb, wb = site_mean(site_b)
    if mode == "normalize":
        ref, _ = combine([(ma, wa), (mb, wb)])
    else:  # swap with reference_site B, or interpolate at site A (B is the only other site)
        _, grid = combine([(ma, wa), (mb, wb)])
        ref = resample(mb, grid)  # per-site spectra travel on the common grid
    expected = harmonize(target, ref, beta, lam, clip)
    params = {"dim": dim, "mode": mode, "beta": beta, "lambda": lam, "clip": clip,
              "local": "A"}
    if mode == "swap":
        params["reference_site"] = reference
    write_case(name, params, site_a, site_b, target, expected)


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    rng = np.random.default_rng(20240611)
    # 2D, odd and non-square (nx = 53, ny = 37): part of the band, partial mix.
    case(rng, "normalize_2d_odd", 2, 1, [(1, 37, 53)] * 3, [(1, 37, 53)] * 2, (1, 37, 53),
         "normalize", 0.3, 0.7, "none")
    # 3D, odd/even mix, whole spectrum (beta = 1), full replacement.
    case(rng, "normalize_3d", 3, 1, [(9, 14, 11)] * 2, [(9, 14, 11)] * 3, (9, 14, 11),
         "normalize", 1.0, 1.0, "none")
    # 3 channels, even sizes (Nyquist bins in the band), clip to the input range.
    case(rng, "normalize_rgb", 2, 3, [(1, 24, 30)] * 2, [(1, 24, 30)] * 2, (1, 24, 30),
         "normalize", 0.25, 1.0, "input")
    # DC only (beta = 0): the plugin's no-FFT path against the FFT definition.
    case(rng, "normalize_dc", 2, 1, [(1, 20, 25)] * 2, [(1, 20, 25)] * 1, (1, 20, 25),
         "normalize", 0.0, 1.0, "none")
    # FDA swap with site B's spectrum, small band, clipped at zero.
    case(rng, "swap_2d", 2, 1, [(1, 40, 33)] * 2, [(1, 40, 33)] * 2, (1, 40, 33),
         "swap", 0.1, 1.0, "nonnegative")
    case(rng, "swap_3d", 3, 1, [(12, 10, 16)] * 2, [(12, 10, 16)] * 1, (12, 10, 16),
         "swap", 0.2, 0.5, "none")
    # Interpolation with a fixed lambda (lambda_min = lambda_max) at site A: B's spectrum.
    case(rng, "interpolate_rgb", 2, 3, [(1, 31, 27)] * 2, [(1, 31, 27)] * 2, (1, 31, 27),
         "interpolate", 0.2, 0.4, "none")
    # Different sizes: site A mixes two shapes, B has another, the target a fourth.
    case(rng, "normalize_sizes", 2, 1, [(1, 32, 40), (1, 28, 40), (1, 32, 40)],
         [(1, 36, 48)] * 4, (1, 30, 30), "normalize", 0.5, 1.0, "none")
    case(rng, "normalize_sizes_3d", 3, 1, [(8, 10, 12)] * 2, [(6, 9, 13)] * 1, (7, 11, 10),
         "normalize", 1.0, 0.8, "none")


if __name__ == "__main__":
    main()
