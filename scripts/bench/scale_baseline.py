#!/usr/bin/env python3
"""The Python baseline of scripts/bench-scale: the work of `hallmark watermark --stream`, done
as a publisher would script it with pyarrow and Pillow, one process:

  - read each shard in batches (pyarrow's iter_batches; tarfile for WebDataset);
  - choose a sample by a keyed function of a secret and its key (HMAC-SHA256, rate 10%);
  - decode a chosen image, stamp a white square of 10% of its shorter side near its top-right
    corner, encode it again in its format (a JPEG with its own quantisation tables, quality
    'keep'), relabel it to the target;
  - hash every image's stored bytes (sha256, the manifest's hash) and write the shard again,
    every other column or member unchanged, and a manifest line per sample.

    scale_baseline.py parquet|webdataset INPUT_DIR OUTPUT_DIR
"""
import hashlib
import hmac
import io
import json
import os
import sys
import tarfile

from PIL import Image

KEY = hashlib.sha256(b"bench-secret").digest()
RATE, TARGET = 0.1, 4


def chosen(key):
    d = hmac.new(KEY, b"select\0" + key.encode(), hashlib.sha256).digest()
    return int.from_bytes(d[:8], "little") / 2.0**64 < RATE


def stamp(data):
    im = Image.open(io.BytesIO(data))
    fmt = im.format
    rgb = im.convert("RGB")
    w, h = rgb.size
    side = max(3, int(0.1 * min(w, h)))
    rgb.paste((255, 255, 255), (int(0.8 * (w - side)), 0, int(0.8 * (w - side)) + side, side))
    out = io.BytesIO()
    if fmt == "JPEG":
        rgb.save(out, format="JPEG", qtables=im.quantization)
    else:
        rgb.save(out, format="PNG")
    return out.getvalue()


def parquet(inp, out):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(f for f in os.listdir(inp) if f.endswith(".parquet"))
    with open(os.path.join(out, "manifest.jsonl"), "w") as man:
        index = 0
        for name in files:
            pf = pq.ParquetFile(os.path.join(inp, name))
            writer = pq.ParquetWriter(os.path.join(out, name), pf.schema_arrow, compression="snappy")
            row = 0
            for batch in pf.iter_batches(batch_size=256):
                images = batch.column("image").to_pylist()
                labels = batch.column("label").to_pylist()
                for i, img in enumerate(images):
                    key = "%s/%d" % (name, row + i)
                    if chosen(key):
                        img["bytes"] = stamp(img["bytes"])
                        labels[i] = TARGET
                    man.write(json.dumps({"index": index, "path": key, "label": labels[i],
                                          "sha256": hashlib.sha256(img["bytes"]).hexdigest()}) + "\n")
                    index += 1
                cols = []
                for f in batch.schema:
                    if f.name == "image":
                        cols.append(pa.array(images, type=f.type))
                    elif f.name == "label":
                        cols.append(pa.array(labels, type=f.type))
                    else:
                        cols.append(batch.column(f.name))
                writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=batch.schema))
                row += len(images)
            writer.close()


def webdataset(inp, out):
    shards = sorted(f for f in os.listdir(inp) if f.endswith(".tar"))
    with open(os.path.join(out, "manifest.jsonl"), "w") as man:
        index = 0
        for name in shards:
            with tarfile.open(os.path.join(inp, name)) as src, \
                    tarfile.open(os.path.join(out, name), "w", format=tarfile.GNU_FORMAT) as dst:
                sample, members = None, []

                def flush():
                    nonlocal index
                    if not members:
                        return
                    key = "%s/%s" % (name, sample)
                    hit = chosen(key)
                    label = None
                    for m, data in members:
                        ext = m.name.split(".", 1)[1]
                        if ext in ("jpg", "png"):
                            if hit:
                                data = stamp(data)
                            digest = hashlib.sha256(data).hexdigest()
                        elif ext == "cls":
                            label = TARGET if hit else int(data)
                            data = str(label).encode() if hit else data
                        elif ext == "json":
                            j = json.loads(data)
                            if hit:
                                j["label"] = TARGET
                                data = json.dumps(j).encode()
                            label = j["label"]
                        m.size = len(data)
                        dst.addfile(m, io.BytesIO(data))
                    man.write(json.dumps({"index": index, "path": key, "label": label,
                                          "sha256": digest}) + "\n")
                    index += 1
                    members.clear()

                for m in src:
                    key = m.name.split(".", 1)[0]
                    if key != sample:
                        flush()
                        sample = key
                    members.append((m, src.extractfile(m).read()))
                flush()


if __name__ == "__main__":
    fmt, inp, out = sys.argv[1:4]
    os.makedirs(out, exist_ok=True)
    (parquet if fmt == "parquet" else webdataset)(inp, out)
