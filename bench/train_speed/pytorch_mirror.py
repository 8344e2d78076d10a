#!/usr/bin/python3
"""The built-in `cnn` and `unet` models (plugins/models/cnn/cnn.cpp, plugins/models/unet/unet.cpp)
in PyTorch, trained the way core/src/local_training.cpp trains them: one local epoch over N
images in a shuffled order, batches of B, Adam, cross-entropy (+ soft Dice for segmentation),
loss.item() per step. Timed like bench_train_speed: one warm-up epoch, then EPOCHS epochs; prints
"key value" lines (images per second of the best epoch and of the median one).

The images are held as one stacked tensor and each batch is an index into it: the fastest plain
PyTorch loop (no DataLoader), so the baseline is the strictest one.

Usage: pytorch_mirror.py MODEL SIZE THREADS [BATCH (32)] [IMAGES (160)] [EPOCHS (5)]"""
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]


class Cnn(nn.Module):
    """cnn.cpp: conv-BN-ReLU blocks of width * 2^min(i-1, 3) channels, 2x2 max pooling between
    blocks, global average pooling, (dropout 0), a linear head."""

    def __init__(self, cin, classes, width=32, depth=4):
        super().__init__()
        chans = [width << min(i, 3) for i in range(depth)]
        self.blocks = nn.ModuleList(
            nn.Sequential(*conv_bn(cin if i == 0 else chans[i - 1], chans[i]), nn.ReLU())
            for i in range(depth))
        self.head = nn.Linear(chans[-1], classes)

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i + 1 < len(self.blocks):
                x = F.max_pool2d(x, 2)
        return self.head(x.mean((2, 3)))


class DoubleConv(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(*conv_bn(cin, cout), nn.ReLU(), *conv_bn(cout, cout), nn.ReLU())


class UNet(nn.Module):
    """unet.cpp: DoubleConv stem and downs (max pooling), ups as a 1x1 conv to 4x the channels,
    pixel shuffle, concatenation with the skip, DoubleConv; a 1x1 head."""

    def __init__(self, cin, classes, width=16, levels=3):
        super().__init__()
        self.stem = DoubleConv(cin, width)
        self.down = nn.ModuleList(DoubleConv(width << (l - 1), width << l)
                                  for l in range(1, levels + 1))
        self.upconv = nn.ModuleList(nn.Conv2d(width << l, 4 * ((width << l) // 2), 1)
                                    for l in range(levels, 0, -1))
        self.upc = nn.ModuleList(DoubleConv(width << l, (width << l) // 2)
                                 for l in range(levels, 0, -1))
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        feats = [self.stem(x)]
        for d in self.down:
            feats.append(d(F.max_pool2d(feats[-1], 2)))
        x = feats[-1]
        for i, (u, c) in enumerate(zip(self.upconv, self.upc)):
            x = c(torch.cat([feats[-2 - i], F.pixel_shuffle(u(x), 2)], 1))
        return self.head(x)


def task_loss(seg, logits, y):
    ce = F.cross_entropy(logits, y)
    if not seg:
        return ce
    prob = torch.softmax(logits, 1)
    onehot = F.one_hot(y, logits.size(1)).permute(0, 3, 1, 2).float()
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + 1) / (denom + 1)
    return ce + (1 - dice[1:].mean())


def main():
    model_name, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 160
    epochs = int(sys.argv[6]) if len(sys.argv) > 6 else 5
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    seg = model_name == "unet"
    model = UNet(1, 2) if seg else Cnn(1, 2)
    x_all = torch.rand(n, 1, size, size)
    if seg:
        y_all = (x_all[:, 0] > 0.7).long()
    else:
        y_all = torch.randint(0, 2, (n,))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()

    def epoch():
        order = torch.randperm(n)
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            if len(idx) < 2:
                break
            xb, yb = x_all[idx], y_all[idx]
            opt.zero_grad()
            loss = task_loss(seg, model(xb), yb)
            loss.backward()
            opt.step()
            loss.item()
        return time.perf_counter() - t0

    epoch()
    rates = [n / epoch() for _ in range(epochs)]
    print(f"train_img_per_s {max(rates):.2f}")
    print(f"train_median_img_per_s {statistics.median(rates):.2f}")
    # Evaluation as LocalTraining::predict: eval mode, no gradients, batches of 64, softmax.
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        for s in range(0, n, 64):
            torch.softmax(model(x_all[s:s + 64]), 1)
        print(f"eval_img_per_s {n / (time.perf_counter() - t0):.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
