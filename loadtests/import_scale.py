"""`gateway features import` at scale: time and peak memory for 1M entities.

Writes users.parquet and items.parquet of the generated world (700k users, 300k items by
default) into a temporary folder, starts a redis-server of its own on a free loopback
port, runs the import command as a child process and measures its wall time and peak
RSS (``getrusage(RUSAGE_CHILDREN)``), then checks the store and writes a markdown
result::

    flock /tmp/heavy.lock .venv/bin/python -m loadtests.import_scale \\
        --out loadtests/results/import-1m.md
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from tests.procs import PYTHON, ROOT, RedisServer
from tests.test_import import write_parquet

from gateway.features import codec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=700_000)
    p.add_argument("--items", type=int, default=300_000)
    p.add_argument("--batch", type=int, default=65_536)
    p.add_argument("--out", type=Path, default=None, help="markdown result file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        users, items = write_parquet(Path(tmp), args.users, args.items)
        gen_s = time.perf_counter() - t0
        sizes = users.stat().st_size + items.stat().st_size
        server = RedisServer().start()
        try:
            t0 = time.perf_counter()
            proc = subprocess.run(
                [PYTHON, "-m", "gateway", "features", "import", "--users", str(users),
                 "--items", str(items), "--redis-url", server.url, "--no-progress",
                 "--batch", str(args.batch)],
                capture_output=True, text=True, cwd=ROOT, check=False,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            r = redis.Redis.from_url(server.url)
            gen, _ = codec.parse_pointer(r.get(codec.POINTER_KEY) or b"")
            keys = r.dbsize()
            used_mb = int(r.info("memory")["used_memory"]) / 1e6
            r.close()
        finally:
            server.stop()
    n = args.users + args.items
    assert keys == n + 2, keys
    lines = [
        "# `gateway features import` at 1M entities",
        "",
        f"Command: `flock /tmp/heavy.lock .venv/bin/python -m loadtests.import_scale "
        f"--users {args.users} --items {args.items} --batch {args.batch}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; redis-server on loopback, shared with other work.",
        "",
        "| what | value |",
        "|---|---|",
        f"| entities | {args.users:,} users + {args.items:,} items = {n:,} |",
        f"| Parquet input | {sizes / 1e6:.1f} MB (written in {gen_s:.1f} s, not counted) |",
        f"| import wall time (check pass + write pass + switch, process start included) "
        f"| {wall:.1f} s |",
        f"| throughput | {n / wall:,.0f} entities/s |",
        f"| peak RSS of the import process | {peak_mb:.0f} MB |",
        f"| Redis keys after | {keys:,} (vectors + pointer + generations set) |",
        f"| Redis used_memory after | {used_mb:.0f} MB |",
        "",
        "The command's own summary line:",
        "",
        "```",
        proc.stdout.strip(),
        "```",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
