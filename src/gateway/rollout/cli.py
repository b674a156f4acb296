"""``gateway rollout start|status|promote|abort``: drive a model's rollout in Redis.

::

    gateway rollout start --candidate-version N --mode shadow|canary [--steps 5,20,50,100]
                          [--step-seconds S] [--primary-version P] --redis-url URL
    gateway rollout status [--json] --redis-url URL
    gateway rollout promote --redis-url URL
    gateway rollout abort --redis-url URL

``start --mode canary`` while a shadow of the same candidate runs turns the shadow into
its canary. Every change is a compare-and-set on the state's revision (store.py): two operators, or
an operator and the gateways' decision-maker, cannot overwrite each other. Gateways
follow within a second. Expected failures print one ``error: ...`` line, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError
from gateway.rollout.analysis import counts_from_fields
from gateway.rollout.runtime import promoted, started
from gateway.rollout.state import Action, Mode, Phase, Reason, RolloutState, Variant, parse_steps
from gateway.rollout.store import RedisRolloutStore, RolloutStoreError


def _steps(text: str) -> tuple[float, ...]:
    try:
        return parse_steps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def add_parser(sub: Any) -> None:
    """Register ``gateway rollout ...`` on the top-level subparsers."""
    rollout = sub.add_parser(
        "rollout", help="ship a new model version: shadow, canary"
    ).add_subparsers(dest="rollout_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        from gateway.cli import add_redis_arguments

        add_redis_arguments(p)  # --redis-url (default $GATEWAY_REDIS_URL) and TLS files
        p.add_argument("--model", default="ctr", help="model name (default ctr)")

    p = rollout.add_parser("start", help="start a shadow or canary rollout of a candidate version")
    p.add_argument("--candidate-version", required=True, type=int)
    p.add_argument("--mode", required=True, choices=("shadow", "canary"))
    p.add_argument(
        "--steps",
        type=_steps,
        default=(5.0, 20.0, 50.0, 100.0),
        help="canary percents, default 5,20,50,100",
    )
    p.add_argument(
        "--step-seconds",
        type=_seconds,
        default=300.0,
        help="minimum length of a step (default 300)",
    )
    p.add_argument(
        "--primary-version",
        type=int,
        default=None,
        help="default: the rollout's current primary, else the newest version below the candidate",
    )
    p.add_argument(
        "--model-repository",
        default=None,
        help="where the versions are checked to exist (default: the bundled model_repository)",
    )
    common(p)
    p.set_defaults(func=_cmd_start)

    p = rollout.add_parser("status", help="the rollout's state and this step's counts")
    p.add_argument("--json", action="store_true", help="one JSON object")
    common(p)
    p.set_defaults(func=_cmd_status)

    p = rollout.add_parser("promote", help="make the candidate the primary now")
    common(p)
    p.set_defaults(func=_cmd_promote)

    p = rollout.add_parser("abort", help="stop the rollout: every user back on the primary")
    common(p)
    p.set_defaults(func=_cmd_abort)


def _versions(repo: Path, model: str) -> list[int]:
    folder = repo / model
    if not folder.is_dir():
        raise ConfigError(f"model {model!r} not found in {repo}")
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _run(args: argparse.Namespace, fn: Any) -> int:
    async def go() -> int:
        from gateway.cli import redis_target

        url, tls = redis_target(args)
        store = RedisRolloutStore(url, args.model, timeout_s=2.0, tls=tls)
        try:
            return int(await fn(store))
        finally:
            await store.close()

    return asyncio.run(go())


def _cmd_start(args: argparse.Namespace) -> int:
    from gateway.paths import default_model_repository

    repo = Path(args.model_repository) if args.model_repository else default_model_repository()
    versions = _versions(repo, args.model)
    cand = args.candidate_version
    shown = ", ".join(map(str, versions)) or "none"
    if cand not in versions:
        raise ConfigError(f"unknown version {cand}: {repo / args.model} has versions {shown}")

    async def go(store: RedisRolloutStore) -> int:
        state = await store.read()
        # Shadow, then canary: a running shadow of this candidate turns into its canary.
        follows_shadow = (
            state.running
            and state.mode is Mode.SHADOW
            and args.mode == "canary"
            and state.candidate == str(cand)
        )
        if state.running and not follows_shadow:
            raise ConfigError(
                f"a rollout is already running ({state.mode} of version {state.candidate}, "
                f"{state.weight:g} %); promote or abort it first"
            )
        if args.primary_version is not None:
            primary = args.primary_version
        elif state.primary.isdigit():
            primary = int(state.primary)
        else:
            below = [v for v in versions if v < cand]
            if not below:
                raise ConfigError(
                    f"no version below {cand} to be the primary; name one with --primary-version"
                )
            primary = below[-1]
        if primary not in versions:
            raise ConfigError(f"unknown primary version {primary}: {repo / args.model} has {shown}")
        if primary == cand:
            raise ConfigError(f"version {cand} is the primary already")
        new = started(
            state,
            time.time(),
            str(primary),
            str(cand),
            Mode(args.mode),
            args.steps,
            args.step_seconds,
        )
        new = await store.write(new, state.rev)
        print(_summary(new, args.model))
        return 0

    return _run(args, go)


def _cmd_status(args: argparse.Namespace) -> int:
    async def go(store: RedisRolloutStore) -> int:
        state = await store.read()
        counts = (
            counts_from_fields(await store.counts(state.counts_token)) if state.rollout_id else None
        )
        if args.json:
            body = state.public(args.model)
            body["counts"] = (
                {
                    str(v): {
                        "requests": c.requests,
                        "failures": c.failures,
                        "p99_ms": c.quantile_ms(0.99),
                    }
                    for v, c in counts.items()
                }
                if counts
                else None
            )
            print(json.dumps(body))
            return 0
        print(_summary(state, args.model))
        if state.last:
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.last.at))
            print(f"last decision: {state.last.action} at {at}: {state.last.reason}")
        if counts and state.running and state.mode is Mode.CANARY:
            parts = []
            for v in Variant:
                c = counts[v]
                p99 = c.quantile_ms(0.99)
                parts.append(
                    f"{v} {c.requests} requests, {c.failures} failed ({c.failure_rate:.2%}), "
                    f"P99 {'-' if p99 is None else f'{p99:.1f} ms'}"
                )
            print("this step: " + "; ".join(parts))
        return 0

    return _run(args, go)


def _cmd_promote(args: argparse.Namespace) -> int:
    async def go(store: RedisRolloutStore) -> int:
        state = await store.read()
        if not state.candidate or state.phase is Phase.PROMOTED:
            raise ConfigError("no candidate to promote: start a rollout first")
        new = await store.write(
            promoted(state, time.time(), f"{Reason.OPERATOR}: promoted"), state.rev
        )
        print(_summary(new, args.model))
        return 0

    return _run(args, go)


def _cmd_abort(args: argparse.Namespace) -> int:
    async def go(store: RedisRolloutStore) -> int:
        state = await store.read()
        if not state.running:
            raise ConfigError(f"no rollout is running (state {state.phase})")
        new = state.with_decision(
            time.time(), Action.ABORT, f"{Reason.OPERATOR}: aborted", phase=Phase.ROLLED_BACK
        )
        new = await store.write(new, state.rev)
        print(_summary(new, args.model))
        return 0

    return _run(args, go)


def _summary(state: RolloutState, model: str) -> str:
    head = f"model {model}: {state.mode} {state.phase}, primary {state.primary or '-'}"
    if state.candidate:
        head += f", candidate {state.candidate}"
    if state.mode is Mode.CANARY and state.steps:
        head += (
            f" at {state.weight:g} % (step {state.step + 1} of {len(state.steps)}, "
            f"{state.step_seconds:g} s each)"
        )
    return head


__all__ = ["RolloutStoreError", "add_parser"]
