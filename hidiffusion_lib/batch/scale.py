"""How the batch client alone scales with the number of webuis: ``python -m hidiffusion_lib.batch.scale``.

It starts N fake webui APIs (fake_api.py) on 127.0.0.1, each answering every generation after a fixed
latency (standing for the GPU's time), and runs M tiny jobs through the real scheduler (runner.run,
with its pre-flight checks, image checks, atomic writes and manifest) for each N. What is left over
the ideal time (latency times the jobs per server) is the client's own cost per job.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .client import Backoff
from .fake_api import fleet, loopback_client
from .jobfile import Job, expand
from .runner import run


@dataclass(frozen=True)
class Row:
    """One measurement: ``jobs`` jobs on ``servers`` fake webuis of ``latency`` seconds took ``seconds``."""

    servers: int
    jobs: int
    latency: float
    seconds: float

    @property
    def throughput(self) -> float:
        """Jobs per second."""
        return self.jobs / self.seconds

    @property
    def rounds(self) -> int:
        """Jobs per server, the busiest one's."""
        return math.ceil(self.jobs / self.servers)

    @property
    def ideal(self) -> float:
        """Seconds with no client cost at all: the busiest server's jobs back to back."""
        return self.rounds * self.latency

    @property
    def overhead(self) -> float:
        """Seconds each job holds its server beyond the latency: the client's cost per job."""
        return (self.seconds - self.ideal) / self.rounds


def tiny_jobs(count: int) -> list[Job]:
    """``count`` distinct 64x64 one-step jobs (seeds 0 ... count-1)."""
    data = {
        "defaults": {"size": 64, "steps": 1, "hidiffusion": "off"},
        "jobs": [{"name": "scale", "prompt": "scaling", "grid": {"seed": list(range(count))}}],
    }
    return expand(data, "scale", Path("."))


def measure(servers: int, jobs: list[Job], latency: float) -> Row:
    """Run ``jobs`` on ``servers`` fake webuis answering after ``latency`` seconds, into a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="hidiffusion-scale-") as folder, fleet(servers, latency=latency) as fakes:
        clients = [loopback_client(fake.url, backoff=Backoff(retries=0, base=0.01)) for fake in fakes]
        started = time.perf_counter()
        summary = run(jobs, Path(folder), clients, progress=False)
        seconds = time.perf_counter() - started
        made = sum(len(fake.made) for fake in fakes)
    if summary.done != len(jobs) or made != len(jobs):
        raise RuntimeError(f"{summary.done} recorded and {made} made of {len(jobs)} jobs: one lost or repeated")
    return Row(servers, len(jobs), latency, seconds)


def table(rows: list[Row]) -> str:
    """A Markdown table of ``rows``; the speed-up is against the first row's throughput."""
    lines = [
        "| servers | wall s | jobs/s | speed-up | ideal speed-up | client overhead ms/job | efficiency |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = rows[0]
    for row in rows:
        lines.append(
            f"| {row.servers} | {row.seconds:.2f} | {row.throughput:.2f} | {row.throughput / base.throughput:.2f} "
            f"| {base.ideal / row.ideal:.2f} | {row.overhead * 1000:.1f} | {row.ideal / row.seconds:.0%} |"
        )
    return "\n".join(lines)


def machine() -> str:
    """CPUs this process may use, and Python."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpus} CPUs ({platform.machine()}, {platform.system()}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the table."""
    parser = argparse.ArgumentParser(
        prog="python -m hidiffusion_lib.batch.scale",
        description="Throughput of the batch client alone on 1, 2, 4, 8 fake webuis with a fixed latency.",
    )
    parser.add_argument("--servers", default="1,2,4,8", help="server counts, comma-separated (default 1,2,4,8)")
    parser.add_argument("--jobs", type=int, default=32, help="jobs per measurement (default 32)")
    parser.add_argument("--latency", type=float, default=0.2,
                        help="seconds each fake webui takes per job (default 0.2)")
    args = parser.parse_args(argv)
    try:
        counts = [int(n) for n in args.servers.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or args.jobs < 1 or args.latency < 0:
        parser.error("--servers must list numbers >= 1, --jobs must be >= 1 and --latency >= 0")
    jobs = tiny_jobs(args.jobs)
    measure(1, jobs[:2], 0.0)  # warm-up: the first run pays for lazy imports and PIL's plugins
    print(f"{args.jobs} jobs of 64x64, fake webui latency {args.latency:g} s; {machine()}", file=sys.stderr)
    rows = []
    for count in counts:
        rows.append(measure(count, jobs, args.latency))
        print(f"  {count} servers: {rows[-1].seconds:.2f} s", file=sys.stderr)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
