#!/usr/bin/env python3
"""Generates a labelled colour image dataset of mixed sizes, mostly JPEG, as a publisher on the
Hugging Face Hub ships one: Parquet shards in the `datasets` layout (an `image` struct of bytes
and path, a ClassLabel `label`, a `caption` and an `id` column) or WebDataset tar shards (`.jpg`
or `.png`, a `.cls` or `.json` label, a `.txt` caption) or an ImageFolder tree (a folder per
class). Seeded: the same arguments give the
same files. 80% of the images are JPEG (--png-share 0.2 PNG).

    make-mixed-dataset.py --format parquet|webdataset --count N --shards S --out DIR
                          [--min-side 64] [--max-side 512] [--seed 0] [--spoil MODE]
                          [--png-share 0.2]

--spoil (tests of malformed input): bad-image (row/sample 3 is not an image), no-label
(sample 4 of a WebDataset has no label member), truncated (the last shard is cut in the middle
of a member).
"""
import argparse
import io
import json
import os
import random
import tarfile

from PIL import Image, ImageDraw

CLASSES = ["airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


TILE = 1024
_TILES = []


def tiles(rng):
    if not _TILES:
        _TILES.extend(Image.frombytes("L", (TILE, TILE), rng.randbytes(TILE * TILE)) for _ in range(4))
    return _TILES


def image(rng, min_side, max_side, png_share):
    w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
    im = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randrange(1, w // 2 + 2), y0 + rng.randrange(1, h // 2 + 2)
        fill = tuple(rng.randrange(256) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
    # Texture, so that files are of a photograph's size (tens of kB), not of a drawing's: a
    # crop of one of a few seeded noise tiles.
    x, y = rng.randrange(TILE - w + 1), rng.randrange(TILE - h + 1)
    noise = tiles(rng)[rng.randrange(4)].crop((x, y, x + w, y + h)).convert("RGB")
    im = Image.blend(im, noise, rng.choice([0.05, 0.1, 0.2]))
    b = io.BytesIO()
    if rng.random() < 1 - png_share:
        im.save(b, format="JPEG", quality=rng.choice([75, 85, 90, 95]))
        return b.getvalue(), "jpg"
    im.save(b, format="PNG")
    return b.getvalue(), "png"


def samples(args):
    rng = random.Random(args.seed)
    for i in range(args.count):
        data, ext = image(rng, args.min_side, args.max_side, args.png_share)
        if args.spoil == "bad-image" and i == 3:
            data = b"not an image"
        yield i, data, ext, rng.randrange(len(CLASSES))


def shard_ranges(count, shards):
    per = -(-count // shards)
    return [(s, range(s * per, min(count, (s + 1) * per))) for s in range(shards)]


def parquet(args):
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {"info": {"features": {
        "image": {"_type": "Image"},
        "label": {"names": CLASSES, "_type": "ClassLabel"},
        "caption": {"dtype": "string", "_type": "Value"},
        "id": {"dtype": "int32", "_type": "Value"}}}}
    os.makedirs(os.path.join(args.out, "data"), exist_ok=True)
    it = samples(args)
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for s, rows in shard_ranges(args.count, args.shards):
        name = os.path.join(args.out, "data", "train-%05d-of-%05d.parquet" % (s, args.shards))
        writer = None
        batch = []

        def flush():
            nonlocal writer
            if not batch:
                return
            t = pa.table({
                "image": pa.array([{"bytes": b, "path": "%d.%s" % (i, e)} for i, b, e, _ in batch], type=img_type),
                "label": pa.array([l for _, _, _, l in batch], pa.int64()),
                "caption": pa.array(["sample %d" % i for i, _, _, _ in batch]),
                "id": pa.array([i for i, _, _, _ in batch], pa.int32()),
            }).replace_schema_metadata({"huggingface": json.dumps(meta)})
            if writer is None:
                writer = pq.ParquetWriter(name, t.schema)
            # Row groups of 100 rows, as Hugging Face `datasets` writes a dataset with an Image
            # feature (its PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS).
            writer.write_table(t, row_group_size=100)
            batch.clear()

        for _ in rows:
            batch.append(next(it))
            if len(batch) == 1000:
                flush()
        flush()
        if writer is not None:
            writer.close()


def webdataset(args):
    os.makedirs(args.out, exist_ok=True)
    it = samples(args)
    names = []
    for s, rows in shard_ranges(args.count, args.shards):
        name = os.path.join(args.out, "train-%06d.tar" % s)
        names.append(name)
        with tarfile.open(name, "w", format=tarfile.GNU_FORMAT) as tf:
            for _ in rows:
                i, data, ext, label = next(it)
                key = "s%07d" % i
                members = [(key + "." + ext, data), (key + ".txt", b"sample %d" % i)]
                if args.spoil == "no-label" and i == 4:
                    pass
                elif i % 2:
                    members.append((key + ".json", json.dumps({"label": label, "id": i}).encode()))
                else:
                    members.append((key + ".cls", str(label).encode()))
                for n, b in members:
                    ti = tarfile.TarInfo(n)
                    ti.size, ti.mtime, ti.mode = len(b), 0, 0o644
                    tf.addfile(ti, io.BytesIO(b))
    if args.spoil == "truncated":
        size = os.path.getsize(names[-1])
        with open(names[-1], "r+b") as f:
            f.truncate(size // 2)


def folder(args):
    it = samples(args)
    for i, data, ext, label in it:
        d = os.path.join(args.out, CLASSES[label])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "%07d.%s" % (i, ext)), "wb") as f:
            f.write(data)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--format", choices=["parquet", "webdataset", "folder"], required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--min-side", type=int, default=64)
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spoil", default="")
    p.add_argument("--png-share", type=float, default=0.2)
    args = p.parse_args()
    {"parquet": parquet, "webdataset": webdataset, "folder": folder}[args.format](args)


if __name__ == "__main__":
    main()
