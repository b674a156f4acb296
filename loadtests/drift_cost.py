"""``python -m loadtests.drift_cost``: what drift counting costs per request, in process.

The benchmark (``python -m loadtests.bench --scenarios
gateway,gateway-drift-off,gateway-drift-all``) compares the gateway's CPU per request
with counting at the default rate, off and on every request, in one run; on a shared
two-core machine its step-to-step noise (10-30 %) is far larger than the cost itself.
This measures the cost directly: the observer the pipeline calls for every finished
prediction (drift.py's ``DriftObserver``, here counting every request: sample rate 1)
on the matrices the benchmark's requests become (50 items, users and items drawn as in
training, the committed profile), and one flush into prometheus-client's multiprocess
files (as with ``--workers 2`` or more; the gateway flushes every 2 s). Writes
``loadtests/results/drift-observer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

# prometheus-client picks its value store when imported: multiprocess files, as the
# gateway's workers use, need the directory first.
_MP_DIR = tempfile.TemporaryDirectory(prefix="drift-cost-")
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", _MP_DIR.name)

import numpy as np  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from gateway.drift import DriftObserver, load_profile  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.observe import Prediction  # noqa: E402
from gateway.paths import default_model_repository  # noqa: E402
from gateway.schema import DEVICES, SCHEMA  # noqa: E402
from gateway.synth import DEVICE_P, HOUR_P, make_world  # noqa: E402

REQUESTS = 2_000


def predictions(items: int, seed: int = 1) -> list[Prediction]:
    world = make_world()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(REQUESTS):
        u = rng.choice(world.n_users, p=world.user_weight)
        it = rng.choice(world.n_items, items, p=world.item_weight)
        ctx = {"hour": int(rng.choice(24, p=HOUR_P)), "device": DEVICES[rng.choice(3, p=DEVICE_P)]}
        matrix = SCHEMA.assemble(
            world.user_vectors[u], world.item_vectors[it], SCHEMA.encode_context(ctx)
        )
        scores = rng.random(items).astype(np.float32)
        out.append(
            Prediction("u", items, matrix, scores, "ctr", "1", None, False, 0, 0, 0.001, 0.001, 0)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.drift_cost", description=__doc__)
    p.add_argument("--items", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("loadtests/results/drift-observer.json"))
    args = p.parse_args(argv)
    profile = load_profile(default_model_repository(), "ctr", "1")
    assert profile is not None, "no drift profile for ctr version 1"
    metrics = Metrics(CollectorRegistry())
    obs = DriftObserver(
        profile, lambda c, b: metrics.drift_bin_rows.labels("ctr", "1", c, b), sample_rate=1.0
    )
    preds = predictions(args.items)
    per_request, per_flush = [], []
    for _ in range(args.repeats):
        t0 = time.process_time()
        for pred in preds:
            obs(pred)
        per_request.append((time.process_time() - t0) / len(preds))
        t0 = time.process_time()
        obs.flush()
        per_flush.append(time.process_time() - t0)
    result = {
        "items": args.items,
        "requests_per_repeat": len(preds),
        "repeats": args.repeats,
        "observer_us_per_request_median": round(float(np.median(per_request)) * 1e6, 2),
        "observer_us_per_request_min": round(float(np.min(per_request)) * 1e6, 2),
        "flush_us_median": round(float(np.median(per_flush)) * 1e6, 1),
        "flush_into": "prometheus-client multiprocess files",
        "bins": obs.counter.size,
        "clock": "time.process_time (CPU time of this process)",
        "machine": f"{platform.machine()}, {platform.platform()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
