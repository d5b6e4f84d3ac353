"""Pull a sharded model from S3: the trainer's fetcher against a plain boto3 download loop.

    make cluster-up
    .venv/bin/python benchmarks/s3_pull.py              # 8 x 256 MiB, 3 alternating repetitions
    .venv/bin/python benchmarks/s3_pull.py --quick      # 2 x 32 MiB, 2 repetitions

The shards (random bytes, named like safetensors shards) are uploaded once to a prefix of the
local S3 server (MinIO from `make cluster-up`) and reused while their sizes match. Then, in one
run, with the order alternating between repetitions:

* baseline: `boto3.client("s3").download_file(...)` for each listed object in turn, default
  settings (TransferConfig defaults: ranged GETs of 8 MiB on up to 10 threads *per object*);
* contender: `Storage(...).fetch(prefix, dest)` of kubetune_trainer.storage with the ETag cache
  disabled (use_cache=False), so every byte is downloaded;
* reference: download_file with use_threads=False (one request at a time: a single stream);
* contender with a warm ETag cache: a re-fetch of unchanged objects (hard links, no GETs).

Every run writes into a fresh directory, removed afterwards. The page cache cannot be dropped
here (no root), so the server reads the shards from memory: the figures measure the client and
the HTTP path, not the server's disk. Results go to docs/benchmarks/s3_pull.json and a PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import io
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib

MiB = 1024 * 1024
GB = 1e9
# --sweep: Storage settings tried against its defaults (8 workers, 10 requests, 32 MiB parts).
SWEEP: dict[str, dict[str, int]] = {
    "4 requests": {"max_concurrency": 4},
    "20 requests": {"max_concurrency": 20},
    "8 MiB parts": {"multipart_threshold": 8 * MiB, "multipart_chunksize": 8 * MiB},
    "64 MiB parts": {"multipart_threshold": 64 * MiB, "multipart_chunksize": 64 * MiB},
    "2 workers, 2 requests": {"max_workers": 2, "max_concurrency": 2},
}


@dataclass
class Variant:
    key: str
    label: str
    run: Callable[[Path], None]
    wall_s: list[float] = field(default_factory=list)
    client_cpu_s: list[float] = field(default_factory=list)
    server_cpu_s: list[float] = field(default_factory=list)


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_pid() -> int | None:
    pid_file = benchlib.ROOT / ".dev" / "run" / "minio.pid"
    try:
        pid = int(pid_file.read_text().strip())
        Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return pid


def _cpu_of(pid: int | None) -> float:
    """User + system CPU seconds of another process (the S3 server), 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)


def shard_keys(prefix: str, shards: int) -> list[str]:
    return [f"{prefix}/model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]


def ensure_shards(client: Any, bucket: str, prefix: str, shards: int, size: int) -> bool:
    """Upload random shards unless the prefix already holds exactly these sizes. Returns
    whether anything was uploaded."""
    wanted = {key: size for key in shard_keys(prefix, shards)}
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix + "/"
    ):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = int(obj["Size"])
    if found == wanted:
        return False
    stale = [{"Key": k} for k in found if k not in wanted]
    for start in range(0, len(stale), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": stale[start : start + 1000]})
    for key in wanted:
        if found.get(key) != size:
            client.upload_fileobj(io.BytesIO(os.urandom(size)), bucket, key)
    return True


@contextlib.contextmanager
def fresh_dir(root: Path, name: str) -> Iterator[Path]:
    path = root / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_download(dest: Path, keys: list[str], prefix: str, size: int, reference: Path) -> None:
    """Every shard present with the right size; the first one byte-identical to the reference."""
    for key in keys:
        path = dest / key[len(prefix) + 1 :]
        if path.stat().st_size != size:
            raise SystemExit(f"{path}: {path.stat().st_size} bytes, expected {size}")
    first = dest / keys[0][len(prefix) + 1 :]
    if not filecmp.cmp(first, reference, shallow=False):
        raise SystemExit(f"{first} differs from the reference download")


def measure(variant: Variant, root: Path, name: str, verify: Callable[[Path], None]) -> float:
    server = _server_pid()
    with fresh_dir(root, name) as dest:
        cpu0, srv0 = _cpu_self(), _cpu_of(server)
        start = time.perf_counter()
        variant.run(dest)
        wall = time.perf_counter() - start
        variant.wall_s.append(wall)
        variant.client_cpu_s.append(_cpu_self() - cpu0)
        variant.server_cpu_s.append(_cpu_of(server) - srv0)
        verify(dest)
    return wall


def summarize(variant: Variant, total_bytes: int) -> dict[str, Any]:
    wall = benchlib.median(variant.wall_s)
    return {
        "label": variant.label,
        "wall_s": [round(w, 3) for w in variant.wall_s],
        "median_wall_s": round(wall, 3),
        "gb_per_s": round(total_bytes / wall / GB, 3),
        "median_client_cpu_s": round(benchlib.median(variant.client_cpu_s), 2),
        "median_server_cpu_s": round(benchlib.median(variant.server_cpu_s), 2),
    }


def plot(path: Path, result: dict[str, Any]) -> None:
    """Bar chart of GB/s per variant (sweep rows too, when present)."""
    rows, sweep = result["results"], result.get("sweep") or {}
    labels = {
        "baseline": "boto3 loop\n(default config)",
        "single_stream": "boto3 loop\n(single stream)",
        "contender": "Storage.fetch\n(cache off)",
        "contender_cold_cache": "Storage.fetch\n(cold cache)",
        "sweep_read_only": "1 GET stream,\nread only\n(no file written)",
    }
    shown = {**rows, **sweep}
    names = [*list(labels)[:4], *sweep]
    config = result["config"]
    benchlib.bar_chart(
        path,
        [labels.get(k, "fetch,\n" + k.removeprefix("sweep_").replace(", ", ",\n")) for k in names],
        [shown[k]["gb_per_s"] for k in names],
        title=f"S3 pull of {config['shards']} x {config['shard_mib']} MiB from local MinIO "
        f"(median of {config['repetitions']}); warm-cache re-fetch: "
        f"{rows['contender_warm_cache']['median_wall_s']}s",
        ylabel="GB/s (higher is better)",
        footer=f"{benchlib.device_line(result['device'])} | {result['command']}",
        annotations=[
            f"{shown[k]['gb_per_s']:.2f} GB/s\n{shown[k]['median_wall_s']:.2f}s" for k in names
        ],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pull a sharded model from the local S3 server: Storage.fetch vs boto3.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Needs the local S3 server (make cluster-up) or AWS_ENDPOINT_URL and credentials.",
    )
    parser.add_argument("--shards", type=int, help="number of objects (default 8; quick: 2)")
    parser.add_argument("--shard-mib", type=int, help="MiB per object (default 256; quick: 32)")
    parser.add_argument("--reps", type=int, help="repetitions per variant (default 3; quick: 2)")
    parser.add_argument("--quick", action="store_true", help="a small run (seconds)")
    parser.add_argument("--bucket", help="bucket (default: $KUBETUNE_S3_BUCKET or kubetune)")
    parser.add_argument("--work-dir", type=Path, default=benchlib.ROOT / ".dev/bench/s3_pull")
    parser.add_argument("--out", type=Path, default=benchlib.DOCS_DIR / "s3_pull.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: next to --out)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also time Storage settings (concurrency, part size, workers) and a read-only "
        "single stream, in the same alternation",
    )
    args = parser.parse_args(argv)
    args.shards = args.shards or (2 if args.quick else 8)
    args.shard_mib = args.shard_mib or (32 if args.quick else 256)
    args.reps = args.reps or (2 if args.quick else 3)
    if min(args.shards, args.shard_mib, args.reps) < 1:
        parser.error("--shards, --shard-mib and --reps must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    env = benchlib.load_s3_env()
    os.environ.update(env)  # the baseline is boto3 with nothing but the environment
    import boto3  # noqa: PLC0415
    from boto3.s3.transfer import TransferConfig  # noqa: PLC0415

    from kubetune_trainer.storage import Storage  # noqa: PLC0415

    bucket = args.bucket or env.get("KUBETUNE_S3_BUCKET") or "kubetune"
    size = args.shard_mib * MiB
    total = size * args.shards
    prefix = f"bench/s3-pull/{args.shards}x{args.shard_mib}MiB"
    uri = f"s3://{bucket}/{prefix}/"
    device = benchlib.device_info(with_torch=False)

    setup = boto3.client("s3")
    t0 = time.perf_counter()
    uploaded = ensure_shards(setup, bucket, prefix, args.shards, size)
    upload_s = time.perf_counter() - t0
    print(f"shards at {uri}: {'uploaded' if uploaded else 'already there'} ({upload_s:.1f}s)")

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    keys = shard_keys(prefix, args.shards)

    def boto3_loop(config: TransferConfig | None) -> Callable[[Path], None]:
        def run(dest: Path) -> None:
            client = boto3.client("s3")  # a new client per run, as a script would make
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix + "/"
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    target = dest / obj["Key"][len(prefix) + 1 :]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if config is None:
                        client.download_file(bucket, obj["Key"], str(target))
                    else:
                        client.download_file(bucket, obj["Key"], str(target), Config=config)

        return run

    def fetch(use_cache: bool, **settings: Any) -> Callable[[Path], None]:
        def run(dest: Path) -> None:
            storage = Storage(
                env=env, work_dir=work, use_cache=use_cache, cache_dir=work / "cache", **settings
            )
            storage.fetch(uri, dest)

        return run

    def raw_stream(dest: Path) -> None:
        """One GET per object read in 8 MiB chunks and thrown away: the loopback ceiling of a
        single Python stream (nothing written; not a download)."""
        client = boto3.client("s3")
        for key in keys:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            while body.read(8 * MiB):
                pass

    baseline = Variant(
        "baseline", "boto3 download_file loop, default TransferConfig", boto3_loop(None)
    )
    contender = Variant("contender", "Storage.fetch, cache off", fetch(use_cache=False))
    single = Variant(
        "single_stream",
        "boto3 download_file loop, use_threads=False",
        boto3_loop(TransferConfig(use_threads=False)),
    )
    cached = Variant("contender_warm_cache", "Storage.fetch, warm ETag cache", fetch(True))

    # A reference copy of the first shard, to check every variant's bytes against.
    reference = work / "reference.bin"
    setup.download_file(bucket, keys[0], str(reference))

    def verify(dest: Path) -> None:
        check_download(dest, keys, prefix, size, reference)

    def verify_sweep(dest: Path) -> None:
        if any(dest.iterdir()):
            verify(dest)

    alternating = [baseline, contender, single]
    sweep: list[Variant] = []
    if args.sweep:
        for label, settings in SWEEP.items():
            sweep.append(
                Variant(f"sweep_{label}", f"Storage.fetch, {label}", fetch(False, **settings))
            )
        sweep.append(
            Variant("sweep_read_only", "one GET stream per object, read and discarded", raw_stream)
        )
        alternating += sweep
    for rep in range(args.reps):
        order = alternating if rep % 2 == 0 else alternating[::-1]
        for variant in order:
            wall = measure(variant, work, f"run-{variant.key}", verify_sweep)
            print(f"rep {rep + 1}: {variant.label}: {wall:.2f}s ({total / wall / GB:.2f} GB/s)")

    shutil.rmtree(work / "cache", ignore_errors=True)
    cold = Variant("contender_cold_cache", "Storage.fetch, cache on, cold", fetch(True))
    measure(cold, work, "run-cold", verify)  # fills the cache
    for rep in range(args.reps):
        wall = measure(cached, work, "run-cached", verify)
        print(f"rep {rep + 1}: {cached.label}: {wall:.3f}s")
    shutil.rmtree(work / "cache", ignore_errors=True)
    reference.unlink()

    rows = {v.key: summarize(v, total) for v in (baseline, contender, single, cold, cached)}
    sweep_rows = {v.key: summarize(v, total) for v in sweep}
    ratio = rows["contender"]["gb_per_s"] / rows["baseline"]["gb_per_s"]
    result: dict[str, Any] = {
        "benchmark": "s3_pull",
        "measured_at": benchlib.now(),
        "command": benchlib.command_line(),
        "device": device,
        "config": {
            "shards": args.shards,
            "shard_mib": args.shard_mib,
            "total_bytes": total,
            "repetitions": args.reps,
            "uri": uri,
            "server": "local MinIO (make cluster-up), same machine, over loopback HTTP",
            "storage_settings": "Storage defaults: 8 objects at once, 10 concurrent requests "
            "in total, 32 MiB ranged GETs, 1 MiB write chunks",
        },
        "results": rows,
        "ratio_contender_vs_baseline": round(ratio, 2),
        "ratio_contender_vs_single_stream": round(
            rows["contender"]["gb_per_s"] / rows["single_stream"]["gb_per_s"], 2
        ),
        "sweep": sweep_rows or None,
        "target_ratio": 3.0,
        "target_met": ratio >= 3.0,
        "notes": [
            "GB/s = 10^9 bytes per second of wall time, median over the repetitions; the "
            "order of baseline/contender/single-stream alternates between repetitions.",
            "The page cache cannot be dropped without root: the server's shard files are in "
            "memory, so this measures the client and the HTTP path, not a disk.",
            "Client and server share the same CPU cores (client_cpu_s and server_cpu_s show "
            "who used them).",
        ],
    }
    benchlib.write_json(args.out, result)
    print(
        f"Storage.fetch {rows['contender']['gb_per_s']} GB/s vs boto3 loop "
        f"{rows['baseline']['gb_per_s']} GB/s: {ratio:.2f}x (target 3x); "
        f"warm cache {rows['contender_warm_cache']['median_wall_s']}s -> {args.out}"
    )
    if not args.no_plot:
        plot(args.plot or args.out.with_suffix(".png"), result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
