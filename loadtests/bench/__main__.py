"""``python -m loadtests.bench [--quick]``: the whole benchmark, one command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loadtests.bench.arrivals import KINDS, Arrivals
from loadtests.bench.report import headline, write
from loadtests.bench.run import FULL_RATES, QUICK_RATES, Config, run
from loadtests.bench.scenarios import SCENARIOS


def _rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive numbers, comma-separated")
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny ladder, short steps (smoke test)")
    p.add_argument("--rates", type=_rates, help="comma-separated requests/s ladder")
    p.add_argument("--duration", type=float, help="seconds per step (default 5, quick 1)")
    p.add_argument("--items", type=int, default=50, help="items per request (default 50)")
    p.add_argument(
        "--connections",
        type=int,
        default=64,
        help="keep-alive connections (default 64; at least --burst-size in burst mode)",
    )
    p.add_argument(
        "--arrivals",
        choices=KINDS,
        default="constant",
        help="arrival process for scenarios that do not pin their own (default constant)",
    )
    p.add_argument("--burst-size", type=int, help="burst mode: requests sent at once (default 20)")
    p.add_argument(
        "--burst-interval-ms", type=float, help="burst mode: milliseconds between bursts"
    )
    p.add_argument("--seed", type=int, default=1, help="workload and Poisson seed (default 1)")
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    names = [s.name for s in SCENARIOS]
    p.add_argument(
        "--scenarios",
        default=",".join(s.name for s in SCENARIOS if "core" in s.tags),
        help=f"comma-separated subset of {','.join(names)}",
    )
    p.add_argument(
        "--baseline-ref",
        help="git revision whose src/gateway runs as the 'gateway-before' scenario",
    )
    p.add_argument(
        "--baseline-paths",
        default="",
        help="comma-separated files under src/gateway: the baseline is today's tree with only "
        "these files taken from --baseline-ref (isolates one change from other work)",
    )
    p.add_argument("--out", type=Path, default=Path("loadtests/results"))
    args = p.parse_args(argv)

    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(names)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.baseline_ref and "gateway-before" not in scenarios:
        scenarios.insert(1, "gateway-before")
    if "gateway-before" in scenarios and not args.baseline_ref:
        p.error("the gateway-before scenario needs --baseline-ref")
    if args.connections < 1:
        p.error("--connections must be at least 1")
    if args.arrivals != "burst" and (args.burst_size or args.burst_interval_ms):
        p.error("--burst-size and --burst-interval-ms need --arrivals burst")
    try:
        arrivals = Arrivals(
            args.arrivals,
            burst_size=args.burst_size,
            burst_interval_s=args.burst_interval_ms / 1e3 if args.burst_interval_ms else None,
            seed=args.seed,
        )
    except ValueError as exc:
        p.error(str(exc))
    rates = args.rates or (QUICK_RATES if args.quick else FULL_RATES)
    if arrivals.fixed_rate is not None:
        # Size and interval fix the rate: one step, unless a ladder was asked for too.
        if args.rates:
            p.error(
                "in burst mode give two of --rates, --burst-size, --burst-interval-ms: "
                "the third follows (rate = size / interval)"
            )
        rates = [arrivals.fixed_rate]
    by_name = {s.name: s for s in SCENARIOS}
    for name in scenarios:
        process = by_name[name].arrivals or arrivals
        if process.kind != "burst":
            continue
        biggest = max(process.at(r).burst_size for r in rates)
        if biggest > args.connections:
            p.error(
                f"{name}: bursts of {biggest} need at least as many --connections (have "
                f"{args.connections}): a burst goes out at once only on idle connections"
            )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    cfg = Config(
        rates=rates,
        duration_s=args.duration or (1.0 if args.quick else 5.0),
        warmup_s=1.0 if args.quick else 2.0,
        items=args.items,
        connections=args.connections,
        scenarios=scenarios,
        out=args.out,
        baseline_ref=args.baseline_ref,
        baseline_paths=[x for x in args.baseline_paths.split(",") if x],
        workers=args.workers,
        bodies=200 if args.quick else 2_000,
        # A smoke run does not wait for a quiet machine.
        quiet_max_wait_s=0.0 if args.quick else 5.0,
        arrivals=arrivals,
        seed=args.seed,
        quick=args.quick,
    )
    data = run(cfg)
    md = write(data, cfg.out)
    h = headline(data)
    print(f"results: {md}")
    for k, v in h.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
