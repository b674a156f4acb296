"""The ``gateway`` command.

::

    gateway serve [--host H] [--port P] [--workers N]
    gateway model build [--out DIR] [--seed N] [--impressions N] [--schema FILE] ...
    gateway model profile [--model-repository DIR] [--model NAME] [--version N]
    gateway triton-local [--model-repository DIR] [--http-port P] [--grpc-port P] [--metrics-port P]
    gateway features load [--redis-url URL] [--users N] [--items N] [--seed N] [--schema FILE]
    gateway features import --users U.parquet --items I.parquet [--redis-url URL] [--schema FILE]
    gateway rollout start|status|promote|abort [--redis-url URL] ...   (gateway/rollout/cli.py)

Redis commands take the URL from ``--redis-url`` or, better (a password in a command
line is visible to every user of the machine), from ``GATEWAY_REDIS_URL``, and TLS files
from ``--tls-ca-file``/``--tls-cert-file``/``--tls-key-file`` or the gateway's
``GATEWAY_REDIS_TLS_*`` variables (:func:`add_redis_arguments`, :func:`redis_target`).

Every expected failure (a bad flag value, a missing file, an unreachable server, a
taken port) prints one ``error: ...`` line and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.redisconn import RedisTLS
    from gateway.schema import FeatureSchema


def add_redis_arguments(p: argparse.ArgumentParser) -> None:
    """``--redis-url`` and the TLS files, defaulting to the gateway's ``GATEWAY_*`` variables."""
    env = os.environ.get
    p.add_argument(
        "--redis-url",
        default=env("GATEWAY_REDIS_URL") or None,
        required=not env("GATEWAY_REDIS_URL"),
        help="redis:// or rediss:// URL (default: $GATEWAY_REDIS_URL, which keeps a "
        "password out of the process list)",
    )
    for name, var in (("ca", "CA"), ("cert", "CERT"), ("key", "KEY")):
        p.add_argument(
            f"--tls-{name}-file",
            default=env(f"GATEWAY_REDIS_TLS_{var}_FILE") or None,
            help=f"rediss:// only: TLS {name} file (default: $GATEWAY_REDIS_TLS_{var}_FILE)",
        )


def redis_target(args: argparse.Namespace) -> tuple[str, RedisTLS]:
    """The URL and TLS files :func:`add_redis_arguments` parsed (checked when connecting)."""
    from gateway.redisconn import RedisTLS

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    tls = RedisTLS(path(args.tls_ca_file), path(args.tls_cert_file), path(args.tls_key_file))
    return args.redis_url, tls


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


KEEP_HELP = (
    "older generations kept after the switch (default 1: the previous one, for gateways "
    "that have not read the new pointer yet)"
)


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return value


def _cmd_serve(args: argparse.Namespace) -> int:
    from gateway.server import serve

    return serve(host=args.host, port=args.port, workers=args.workers)


def _schema(args: argparse.Namespace) -> FeatureSchema:
    from gateway.schema import load_schema

    return load_schema(args.schema)


def _cmd_model_build(args: argparse.Namespace) -> int:
    from gateway.modelbuild import BuildConfig, build

    build(
        BuildConfig(
            schema=_schema(args),
            out=Path(args.out),
            seed=args.seed,
            users=args.users,
            items=args.items,
            impressions=args.impressions,
            epochs=args.epochs,
            version=args.version,
        )
    )
    return 0


def _cmd_model_profile(args: argparse.Namespace) -> int:
    from gateway.modelbuild import profile_existing
    from gateway.paths import default_model_repository

    repo = Path(args.model_repository) if args.model_repository else default_model_repository()
    path = profile_existing(repo, args.model, args.version)
    print(f"wrote {path}")
    return 0


def _cmd_triton_local(args: argparse.Namespace) -> int:
    from gateway.paths import default_model_repository
    from gateway.triton_local.server import Ports, run

    repo = Path(args.model_repository) if args.model_repository else default_model_repository()
    return run(
        repo,
        Ports(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port),
        host=args.host,
        log_verbose=args.log_verbose,
    )


def _cmd_features_load(args: argparse.Namespace) -> int:
    from gateway.features.loader import load

    redis_url, tls = redis_target(args)
    load(
        redis_url=redis_url,
        tls=tls,
        users=args.users,
        items=args.items,
        seed=args.seed,
        chunk=args.chunk,
        progress=not args.no_progress,
        cluster=args.cluster,
        schema=_schema(args),
        keep=args.keep,
    )
    return 0


def _cmd_features_import(args: argparse.Namespace) -> int:
    from gateway.features.importer import import_parquet

    redis_url, tls = redis_target(args)
    import_parquet(
        users=Path(args.users),
        items=Path(args.items),
        redis_url=redis_url,
        tls=tls,
        schema=_schema(args),
        batch=args.batch,
        progress=not args.no_progress,
        cluster=args.cluster,
        keep=args.keep,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP gateway (embedded backends unless configured)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8080)
    p.add_argument("--workers", type=_positive, default=1)
    p.set_defaults(func=_cmd_serve)

    model = sub.add_parser("model", help="model commands").add_subparsers(
        dest="model_command", required=True
    )
    p = model.add_parser("build", help="train, export ONNX FP32, quantize INT8, write the report")
    p.add_argument("--out", default="model_repository", help="model repository to write into")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--users", type=_positive, default=10_000)
    p.add_argument("--items", type=_positive, default=5_000)
    p.add_argument("--impressions", type=_positive, default=250_000)
    p.add_argument("--epochs", type=_positive, default=4)
    p.add_argument("--schema", default=None, help="feature schema file (default: built-in CTR)")
    p.add_argument(
        "--version",
        type=_positive,
        default=None,
        help="add ctr/<N>/ (model files and its report) to the repository for a rollout; "
        "default: rebuild version 1, ctr_fp32 and build_report.json",
    )
    p.set_defaults(func=_cmd_model_build)
    p = model.add_parser(
        "profile", help="write the drift profile of a built version (model files untouched)"
    )
    p.add_argument("--model-repository", default=None)
    p.add_argument("--model", default="ctr")
    p.add_argument("--version", type=str, default="1")
    p.set_defaults(func=_cmd_model_profile)

    p = sub.add_parser("triton-local", help="run the real Triton server on CPU, in the foreground")
    p.add_argument("--model-repository", default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--http-port", type=_port, default=8000)
    p.add_argument("--grpc-port", type=_port, default=8001)
    p.add_argument("--metrics-port", type=_port, default=8002)
    p.add_argument("--log-verbose", type=int, default=0)
    p.set_defaults(func=_cmd_triton_local)

    features = sub.add_parser("features", help="feature store commands").add_subparsers(
        dest="features_command", required=True
    )
    p = features.add_parser("load", help="write generated user and item features into Redis")
    add_redis_arguments(p)
    p.add_argument("--users", type=_positive, default=10_000)
    p.add_argument("--items", type=_positive, default=5_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--chunk", type=_positive, default=2_000, help="keys per pipelined write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cluster", action="store_true", help="the URL names a Redis Cluster node")
    p.add_argument("--schema", default=None, help="feature schema file (default: built-in CTR)")
    p.add_argument("--keep", type=_non_negative, default=1, help=KEEP_HELP)
    p.set_defaults(func=_cmd_features_load)

    p = features.add_parser(
        "import", help="write user and item features from Parquet files into Redis"
    )
    p.add_argument("--users", required=True, help="Parquet file: user_id + the user features")
    p.add_argument("--items", required=True, help="Parquet file: item_id + the item features")
    add_redis_arguments(p)
    p.add_argument("--schema", default=None, help="feature schema file (default: built-in CTR)")
    # 65,536 rows of a few dozen float32 columns are a few MB per batch: memory stays flat
    # whatever the file's size, and each batch is enough work to amortise its overhead.
    p.add_argument("--batch", type=_positive, default=65_536, help="rows per record batch")
    p.add_argument("--keep", type=_non_negative, default=1, help=KEEP_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cluster", action="store_true", help="the URL names a Redis Cluster node")
    p.set_defaults(func=_cmd_features_import)

    from gateway.rollout.cli import add_parser as add_rollout

    add_rollout(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
