#!/usr/bin/python3
"""The same CycleGAN as harmonizers/cyclegan (networks.cpp, cyclegan.cpp) in PyTorch, timed the
same way as bench_generative: a training step (both generators, then both discriminators, LSGAN,
cycle 10, identity 0.5, 50-image pool, Adam 2e-4 / 0.5) at batch 1 and 4, translation of 2D
128x128 images one by one, and a 128^3 volume slice by slice (8 slices per pass).
Prints "key value" lines. Usage: pytorch_mirror.py THREADS SECONDS [SIZE]"""
import random
import sys
import time

import torch
import torch.nn as nn


def norm(c):
    return nn.InstanceNorm2d(c)  # affine=False, track_running_stats=False, as in C++


class ResnetBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), norm(dim), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), norm(dim))

    def forward(self, x):
        return x + self.conv_block(x)


def resnet_generator(cin, cout, ngf, n_blocks):
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(cin, ngf, 7), norm(ngf), nn.ReLU(True)]
    for i in range(2):
        m = 2 ** i
        layers += [nn.Conv2d(ngf * m, ngf * m * 2, 3, stride=2, padding=1), norm(ngf * m * 2),
                   nn.ReLU(True)]
    layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
    for i in range(2):
        m = 4 >> i
        layers += [nn.ConvTranspose2d(ngf * m, ngf * m // 2, 3, stride=2, padding=1,
                                      output_padding=1), norm(ngf * m // 2), nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, cout, 7), nn.Tanh()]
    return nn.Sequential(*layers)


def patch_discriminator(cin, ndf, n_layers):
    layers = [nn.Conv2d(cin, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2 ** n, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1), norm(ndf * mult),
                   nn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2 ** n_layers, 8)
    layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1), norm(ndf * mult),
               nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    return nn.Sequential(*layers)


def init_normal(m, gain=0.02):
    for name, p in m.named_parameters():
        with torch.no_grad():
            if name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, gain)


class Pool:
    def __init__(self, size):
        self.size, self.images = size, []

    def query(self, images):
        out = []
        for image in images:
            image = image.detach().clone()
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif random.random() > 0.5:
                k = random.randrange(self.size)
                out.append(self.images[k])
                self.images[k] = image
            else:
                out.append(image)
        return torch.stack(out, 0)


class CycleGan:
    def __init__(self, ngf=32, ndf=32, n_blocks=6):
        self.g_a, self.g_b = (resnet_generator(1, 1, ngf, n_blocks) for _ in range(2))
        self.d_a, self.d_b = (patch_discriminator(1, ndf, 3) for _ in range(2))
        for m in (self.g_a, self.g_b, self.d_a, self.d_b):
            init_normal(m)
        self.opt_g = torch.optim.Adam(list(self.g_a.parameters()) + list(self.g_b.parameters()),
                                      lr=2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(list(self.d_a.parameters()) + list(self.d_b.parameters()),
                                      lr=2e-4, betas=(0.5, 0.999))
        self.pool_a, self.pool_b = Pool(50), Pool(50)

    def step(self, real_a, real_b, lam=10.0, lam_idt=0.5):
        mse, l1 = nn.functional.mse_loss, nn.functional.l1_loss
        for p in list(self.d_a.parameters()) + list(self.d_b.parameters()):
            p.requires_grad_(False)
        self.opt_g.zero_grad()
        fake_b = self.g_a(real_a)
        rec_a = self.g_b(fake_b)
        fake_a = self.g_b(real_b)
        rec_b = self.g_a(fake_a)
        idt = l1(self.g_a(real_b), real_b) * lam * lam_idt + l1(self.g_b(real_a), real_a) * lam * lam_idt
        pa, pb = self.d_a(fake_b), self.d_b(fake_a)
        gan = mse(pa, torch.ones_like(pa)) + mse(pb, torch.ones_like(pb))
        cycle = l1(rec_a, real_a) * lam + l1(rec_b, real_b) * lam
        loss_g = gan + cycle + idt
        loss_g.backward()
        self.opt_g.step()
        for p in list(self.d_a.parameters()) + list(self.d_b.parameters()):
            p.requires_grad_(True)
        self.opt_d.zero_grad()

        def d_loss(d, real, fake):
            pr, pf = d(real), d(fake)
            loss = (mse(pr, torch.ones_like(pr)) + mse(pf, torch.zeros_like(pf))) * 0.5
            loss.backward()
            return loss.item()

        d_loss(self.d_a, real_b, self.pool_a.query(fake_b.detach()))
        d_loss(self.d_b, real_a, self.pool_b.query(fake_a.detach()))
        self.opt_d.step()
        return loss_g.item()


def best_rate(fn, items_per_call, seconds, blocks=3):
    """Best of `blocks` timing blocks of >= `seconds` each: items per second."""
    fn()  # warm-up
    best = 0.0
    for _ in range(blocks):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= seconds:
                break
        best = max(best, n * items_per_call / dt)
    return best


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    random.seed(1)
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    gan = CycleGan()
    for m in (gan.g_a, gan.g_b, gan.d_a, gan.d_b):
        m.train()
    data_a = torch.rand(16, 1, size, size) * 2 - 1
    data_b = torch.rand(16, 1, size, size) * 2 - 1
    for batch in (1, 4):
        def one():
            ia = torch.randint(0, 16, (batch,))
            ib = torch.randint(0, 16, (batch,))
            gan.step(data_a[ia], data_b[ib])
        print(f"train_b{batch}_img_per_s {best_rate(one, batch, seconds):.4f}", flush=True)
    g = gan.g_a.eval()
    image = torch.rand(1, 1, size, size) * 2 - 1

    def translate():
        with torch.inference_mode():
            g(image)
    print(f"translate_2d_img_per_s {best_rate(translate, 1, seconds):.4f}", flush=True)
    volume = torch.rand(size, 1, size, size) * 2 - 1

    def translate_volume():
        with torch.inference_mode():
            for z in range(0, size, 8):
                g(volume[z:z + 8])
    t0 = time.perf_counter()
    translate_volume()
    print(f"volume_s {time.perf_counter() - t0:.4f}", flush=True)


if __name__ == "__main__":
    main()
