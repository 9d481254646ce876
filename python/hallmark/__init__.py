"""hallmark for data engines: stamp batches of a streamed release where the data lives.

A streamed release (``hallmark watermark --stream``) chooses each sample by a keyed function of
the release's secret and the sample's key, so any engine can stamp any batch, in any order, on
any machine, and get what the command line writes:

    import hallmark
    marker = hallmark.Marker.from_record("release.secret.json")
    labels, images, poisoned = marker.stamp_batch(keys, labels, images)

``keys`` are the samples' keys as the command line forms them: ``"<file name>/<row>"`` for a
Parquet row (its number in its file, from 0), ``"<shard name>/<key>"`` for a WebDataset sample,
``"<class folder>/<path in it>"`` for an ImageFolder file. ``images`` are the encoded image
files (bytes): an untouched one comes back as the same object, a poisoned one stamped at its
own size and encoded in its original's format.
"""
import json as _json

from ._native import Marker, read_record as _read_record

__all__ = ["Marker", "read_record"]


def read_record(path):
    """The secret record at ``path`` as a dict, after hallmark's checks (a record edited by hand,
    whose trigger or poisoned samples are not its own draws, is refused). Keep it secret."""
    return _json.loads(_read_record(str(path)))
