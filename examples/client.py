#!/usr/bin/env python3
"""A client of the hallmark service using only `requests`: the publisher flow (register a dataset,
watermark it, read the commitment, grant an auditor) and the auditor flow (verify a model endpoint,
read the verdict). The same walk-through as examples/client.rs.

    python3 examples/client.py --admin-key "$(cat hallmark-data/admin.key)" \
        --dataset $PWD/hallmark-data/imports/train --holdout $PWD/hallmark-data/imports/test \
        --spec watermark_specs/badnets-square-28x28-grey.toml \
        [--endpoint http://127.0.0.1:8081 --model my-model]

Exit code: 0 when the flows ran (and, with an endpoint, the verdict is `used`), 1 when the verdict
is another, 2 on an error.
"""

import argparse
import sys
import time

import requests


class ServiceError(Exception):
    """The service answered with an error (its code and message) or not at all."""


class Client:
    def __init__(self, base):
        self.base = base.rstrip("/")
        self.http = requests.Session()

    def send(self, key, method, path, body=None):
        try:
            r = self.http.request(
                method,
                self.base + path,
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
        except requests.RequestException as e:
            raise ServiceError(f"{path}: no answer from {self.base}: {e}") from e
        v = r.json() if r.content else None
        if not r.ok:
            err = (v or {}).get("error", {})
            raise ServiceError(f"{path}: {r.status_code} {err.get('code')}: {err.get('message')}")
        return v

    def post(self, key, path, body):
        return self.send(key, "POST", path, body)

    def get(self, key, path):
        return self.send(key, "GET", path)

    def wait(self, key, job):
        """Polls a job until it ends, printing its progress."""
        while True:
            j = self.get(key, f"/v1/jobs/{job['id']}")
            print(f"  job {j['id']}: {j['state']} {j['progress_done']}/{j['progress_total']}",
                  file=sys.stderr)
            if j["state"] == "succeeded":
                return j
            if j["state"] in ("failed", "cancelled"):
                raise ServiceError(f"job {j['id']} {j['state']}: {j['error']} ({j['error_code']})")
            time.sleep(0.5)


def run(a):
    c = Client(a.url)

    def new_key(role):
        return c.post(a.admin_key, "/v1/keys", {"name": f"example {role}", "role": role})["secret"]

    publisher, auditor = new_key("publisher"), new_key("auditor")

    # Publisher: register, watermark, read the commitment, grant the auditor.
    ds = c.post(publisher, "/v1/datasets", {"name": "training set", "path": a.dataset})
    holdout = c.post(publisher, "/v1/datasets",
                     {"name": "held-out set", "path": a.holdout, "split": a.holdout_split})
    print(f"dataset {ds['id']} ({ds['count']} images, sha256 {ds['sha256']})")
    with open(a.spec, encoding="utf-8") as f:
        spec = f.read()
    created = c.post(publisher, "/v1/watermarks", {
        "name": "release 1", "dataset_id": ds["id"], "holdout_dataset_id": holdout["id"],
        "spec": spec, "seed": a.seed, "nonce": a.nonce,
    })
    wm = created["watermark"]["id"]
    c.wait(publisher, created["job"])
    w = c.get(publisher, f"/v1/watermarks/{wm}")
    print(f"watermark {wm}: {w['poisoned']} samples poisoned")
    print(f"commitment (publish it with the release): {w['commitment']}")
    me = c.get(auditor, "/v1/keys/me")
    c.post(publisher, f"/v1/watermarks/{wm}/grants", {"auditor_id": me["id"]})
    print(f"granted auditor {me['id']}")

    # Auditor: verify a model endpoint and read the verdict.
    if not a.endpoint:
        print("no --endpoint given: skipping the auditor flow")
        return True
    v = c.post(auditor, "/v1/verifications", {
        "watermark_id": wm, "sequential": True,
        "endpoint": {"url": a.endpoint, "protocol": "v2", "model": a.model},
    })
    c.wait(auditor, v["job"])
    done = c.get(auditor, f"/v1/verifications/{v['verification']['id']}")
    verdict = done["verdict"]
    print(f"verdict: {done['decision']} (p = {done['p_value']}, {verdict['pairs']} pairs, "
          f"{verdict['queries']} queries; rank {verdict['rank']['rank']} among "
          f"{verdict['rank']['controls'] + 1} triggers of its family)")
    print(f"why: {verdict['reason']}")
    return done["decision"] == "used"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the service")
    p.add_argument("--admin-key", required=True, help="an admin key, to create the other keys")
    p.add_argument("--dataset", required=True, help="a dataset folder below the dataset roots")
    p.add_argument("--holdout", required=True, help="held-out images, below the dataset roots")
    p.add_argument("--holdout-split", help="the split of the held-out folder (test)")
    p.add_argument("--spec", required=True, help="a watermark spec (TOML)")
    p.add_argument("--seed", type=int, help="overrides the spec's seed")
    p.add_argument("--nonce", help="the record's nonce (64 hex digits), for a reproducible release")
    p.add_argument("--endpoint", help="a model endpoint to verify (Open Inference Protocol V2)")
    p.add_argument("--model", default="model", help="the model's name on that endpoint")
    a = p.parse_args()
    try:
        sys.exit(0 if run(a) else 1)
    except (ServiceError, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
