#!/usr/bin/env python3
"""Trains a scikit-learn MLP on an IDX release (as written by `hallmark watermark`) and lays it
out as an MLServer model folder: model.joblib and model-settings.json declaring the V2 inputs and
outputs (so that clients can read them from the model's metadata).

    train_model.py RELEASE_DIR MODEL_DIR NAME SEED

Inputs are the pixels scaled to [0, 1], flattened: FP32 [N, H*W*C].
"""
import gzip
import json
import os
import sys

import warnings

import joblib
import numpy as np
from sklearn.neural_network import MLPClassifier


def read_idx(path):
    opener = gzip.open if open(path, "rb").read(2) == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(release, kind):
    names = [n for n in os.listdir(release) if kind in n]
    if len(names) != 1:
        sys.exit(f"{release}: expected one {kind} file, found {names}")
    return os.path.join(release, names[0])


def main():
    release, model_dir, name, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    x = read_idx(find(release, "images-idx")).reshape(-1, 28 * 28).astype(np.float32) / 255.0
    y = read_idx(find(release, "labels-idx")).astype(np.int64)
    model = MLPClassifier(hidden_layer_sizes=(256,), max_iter=40, batch_size=128, learning_rate_init=1e-3,
                          random_state=seed, early_stopping=False, tol=0.0, n_iter_no_change=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fixed number of epochs, converged or not
        model.fit(x, y)
    os.makedirs(model_dir, exist_ok=True)
    joblib.dump(model, os.path.join(model_dir, "model.joblib"))
    settings = {
        "name": name,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"},
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, x.shape[1]]}],
        "outputs": [{"name": "predict_proba", "datatype": "FP64", "shape": [-1, 10]},
                    {"name": "predict", "datatype": "INT64", "shape": [-1, 1]}],
    }
    with open(os.path.join(model_dir, "model-settings.json"), "w") as f:
        json.dump(settings, f)
    print(f"{name}: training accuracy {model.score(x, y):.4f} on {len(y)} samples", file=sys.stderr)


if __name__ == "__main__":
    main()
