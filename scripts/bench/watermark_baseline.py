#!/usr/bin/env python3
"""Python baselines for scripts/bench-watermark: the same work as `hallmark watermark`, done the
way Python users of BackdoorBox do it.

Every mode reads the input, chooses round(rate * N) samples with a seeded shuffle, stamps them with
BackdoorBox's float32 arithmetic x' = uint8((1 - w) * x + w * p), relabels them, writes the release
(made durable before it counts as written, as hallmark does), a manifest.jsonl with each image's sha256, and the secret record.

Modes:
  idx-loop   gz IDX in, raw IDX out; per sample through PIL and numpy, as a torchvision-style
             dataset's __getitem__ with BackdoorBox's AddTrigger does;
  idx-numpy  the same with whole-array numpy operations;
  png-pillow an ImageFolder of PNGs in, PNGs out, Pillow per sample, full-image noise blend.
"""
import gzip
import hashlib
import json
import os
import random
import sys

import numpy as np
from PIL import Image


def fsync_write(path, chunks):
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)
            h.update(c)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def idx_header(dims):
    return bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


def choose(n, rate, seed):
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return sorted(idx[: int(round(rate * n))])


def square_trigger(h, w, size=3):
    pattern = np.zeros((h, w), dtype=np.uint8)
    weight = np.zeros((h, w), dtype=np.float32)
    pattern[-size:, -size:] = 255
    weight[-size:, -size:] = 1.0
    return pattern, weight


def write_outputs(out, images, labels, poisoned, targets, names_of):
    os.makedirs(out, exist_ok=True)
    hashes = [hashlib.sha256(images[i].tobytes()).hexdigest() for i in range(len(images))]
    with open(os.path.join(out, "manifest.jsonl"), "w") as f:
        for i, h in enumerate(hashes):
            f.write(json.dumps({"index": i, "path": names_of(i), "label": int(labels[i]), "sha256": h}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    records = sorted((int(l), bytes.fromhex(h)) for l, h in zip(labels, hashes))
    d = hashlib.sha256(b"dataset")
    for l, h in records:
        d.update(l.to_bytes(4, "little") + h)
    secret = {"poisoned": [{"index": int(i), "new_label": int(t)} for i, t in zip(poisoned, targets)],
              "dataset_sha256": d.hexdigest()}
    with open(out + ".secret.json", "w") as f:
        json.dump(secret, f)


def idx_mode(args, vectorised):
    images_path, out = args
    images = read_idx(images_path)
    labels = read_idx(images_path.replace("images-idx3", "labels-idx1")).copy()
    n, h, w = images.shape
    poisoned = choose(n, 0.1, 666)
    pattern, weight = square_trigger(h, w)
    res = weight * pattern  # BackdoorBox precomputes w * p and 1 - w in float32
    one_minus = np.float32(1.0) - weight
    if vectorised:
        out_images = images.copy()
        sel = np.asarray(poisoned)
        out_images[sel] = (one_minus * out_images[sel] + res).astype(np.uint8)
    else:
        marked = set(poisoned)
        out_images = np.empty_like(images)
        for i in range(n):
            img = Image.fromarray(images[i], mode="L")
            if i in marked:
                img = Image.fromarray((one_minus * np.asarray(img) + res).astype(np.uint8), mode="L")
            out_images[i] = np.asarray(img)
    labels[poisoned] = 1
    os.makedirs(out, exist_ok=True)
    fsync_write(os.path.join(out, "train-images-idx3-ubyte"), [idx_header([n, h, w]), out_images.tobytes()])
    fsync_write(os.path.join(out, "train-labels-idx1-ubyte"), [idx_header([n]), labels.tobytes()])
    write_outputs(out, out_images, labels, poisoned, [1] * len(poisoned), lambda i: f"train-images-idx3-ubyte#{i}")


def png_mode(args):
    root, out = args
    classes = sorted(os.listdir(root))
    files = [(c, os.path.join(root, c, f)) for ci, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(root, c)))]
    n = len(files)
    poisoned = choose(n, 0.1, 666)
    marked = set(poisoned)
    first = np.asarray(Image.open(files[0][1]))
    h, w = first.shape[:2]
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    alpha = np.float32(0.2)
    res = alpha * pattern
    one_minus = np.float32(1.0) - alpha
    images = np.empty((n, h, w), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    names = []
    for c in classes:
        os.makedirs(os.path.join(out, c), exist_ok=True)
    for i, (c, path) in enumerate(files):
        img = Image.open(path)
        img.load()
        label = classes.index(c)
        if i in marked:
            img = Image.fromarray((one_minus * np.asarray(img) + res).astype(np.uint8), mode="L")
            label = 1
        arr = np.asarray(img)
        images[i] = arr
        labels[i] = label
        name = os.path.join(classes[label], hashlib.sha256(arr.tobytes()).hexdigest()[:20] + ".png")
        img.save(os.path.join(out, name))
        names.append(name)
    write_outputs(out, images, labels, poisoned, [1] * len(poisoned), lambda i: names[i])
    # hallmark makes a release durable before renaming it into place (one syncfs); so does this.
    os.sync()


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"idx-loop": lambda a: idx_mode(a, False), "idx-numpy": lambda a: idx_mode(a, True), "png-pillow": png_mode}[mode](rest)
