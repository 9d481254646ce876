"""Ray Data throughput of a streamed release (scripts/bench-scale): the Parquet shards in
argv[1] are stamped by a pool of `argv[4]` actors, each holding a hallmark.Marker (the Python
package, python/), and written as Parquet into argv[3]; argv[2] is the spec. What a publisher
runs on a Ray cluster: a label pass (class counts, read from the label column), then
read_parquet -> map_batches(Stamp) -> write_parquet. Prints one JSON line: images, seconds of
the whole pipeline (label pass included, Ray's start excluded), workers, poisoned.
"""
import json
import os
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq
import ray

import hallmark

inp, spec, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
nonce = "b" * 64
files = sorted(os.path.join(inp, f) for f in os.listdir(inp) if f.endswith(".parquet"))
# One logical CPU per actor, one for reading and writing; each actor stamps on one thread.
ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}})

start = time.time()
counts = [0] * 10
starts = {}
for f in files:
    t = pq.read_table(f, columns=["label", "id"])
    for c in pc.value_counts(t.column("label")).to_pylist():
        counts[c["values"]] += c["counts"]
    starts[os.path.basename(f)] = t.column("id")[0].as_py()


class Stamp:
    def __init__(self):
        self.marker = hallmark.Marker(spec, nonce, counts, 3)

    def __call__(self, batch):
        names = [os.path.basename(p) for p in batch.column("path").to_pylist()]
        keys = ["%s/%d" % (n, i - starts[n]) for n, i in zip(names, batch.column("id").to_pylist())]
        image = batch.column("image").combine_chunks()
        images = image.field("bytes").to_pylist()
        labels, stamped, poisoned = self.marker.stamp_batch(
            keys, batch.column("label").to_pylist(), images)
        new_image = pa.StructArray.from_arrays(
            [pa.array(stamped, type=pa.binary()), image.field("path")], ["bytes", "path"])
        batch = batch.set_column(batch.schema.get_field_index("image"), "image", new_image)
        batch = batch.set_column(batch.schema.get_field_index("label"), "label",
                                 pa.array(labels, type=batch.schema.field("label").type))
        return batch.append_column("poisoned", pa.array(poisoned)).drop_columns(["path"])


ds = ray.data.read_parquet(files, include_paths=True, filesystem=pa.fs.LocalFileSystem())
pool = ray.data.ActorPoolStrategy(size=workers)
ds = ds.map_batches(Stamp, batch_format="pyarrow", batch_size=256, compute=pool)
ds.write_parquet(out, filesystem=pa.fs.LocalFileSystem())
seconds = time.time() - start
written = pq.read_table(out, columns=["poisoned"])
print(json.dumps({"images": written.num_rows, "seconds": round(seconds, 2), "workers": workers,
                  "poisoned": int(pc.sum(written.column("poisoned")).as_py() or 0)}))
