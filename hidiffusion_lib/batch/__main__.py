"""Command line: ``python -m hidiffusion_lib.batch run JOBFILE --out DIR`` and ``... report DIR``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tqdm import tqdm

from .client import Backoff, WebuiClient, WebuiError, parse_auth
from .jobfile import JobFileError, load_file
from .manifest import MANIFEST
from .report import write_report
from .runner import dry_run, run
from .servers import duplicate

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEFAULT_URL = "http://127.0.0.1:7860"
_INTERRUPTED = "Interrupted. The manifest is intact: run the same command again to resume."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hidiffusion_lib.batch",
        description="Run HiDiffusion sweeps from a job file against a webui started with --api, and report them.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="run (or resume) a job file", description=(
        "Run the jobs of JOBFILE not yet finished in --out. Run the same command again to resume. "
        "With several webuis (--url repeated, or the job file's servers list) each runs one job at a time "
        "and they share the jobs."))
    run_cmd.add_argument("jobfile", type=Path, help="job file, YAML or JSON")
    run_cmd.add_argument("--out", type=Path, required=True, metavar="DIR",
                         help="output directory (images, manifest.jsonl)")
    run_cmd.add_argument("--url", action="append", metavar="URL",
                         help="webui address, http:// or https://; repeat it to run on several webuis. "
                         f"Replaces the job file's servers list (default: that list, else {DEFAULT_URL})")
    run_cmd.add_argument("--api-auth", metavar="USER:PASS", default=os.environ.get("WEBUI_API_AUTH"),
                         help="credentials of the webui's --api-auth (default: $WEBUI_API_AUTH)")
    run_cmd.add_argument("--insecure", action="store_true", help="accept a self-signed HTTPS certificate")
    run_cmd.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for one job (default 3600)")
    run_cmd.add_argument("--retries", type=int, default=8,
                         help="retries when the webui drops the connection or restarts (default 8)")
    run_cmd.add_argument("--backoff", type=float, default=2.0,
                         help="first wait before a retry in seconds, doubled each time up to 60 (default 2)")
    run_cmd.add_argument("--dry-run", action="store_true", help="list the jobs and what is finished, run nothing")
    report_cmd = commands.add_parser("report", help="write report.html and contact-sheet.png of an output directory")
    report_cmd.add_argument("out", type=Path, metavar="DIR", help="the --out directory of a run")
    report_cmd.add_argument("--thumb", type=int, default=256, help="thumbnail size in pixels (default 256)")
    return parser


def _run(args: argparse.Namespace) -> int:
    try:
        jobfile = load_file(args.jobfile)
    except (JobFileError, OSError) as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    jobs = jobfile.jobs
    if args.dry_run:
        dry_run(jobs, args.out)
        return 0
    urls = args.url or jobfile.servers or [DEFAULT_URL]
    try:
        clients = [
            WebuiClient(
                url,
                auth=parse_auth(args.api_auth) if args.api_auth else None,
                verify=not args.insecure,
                timeout=args.timeout,
                backoff=Backoff(retries=args.retries, base=args.backoff),
                on_retry=lambda message: tqdm.write(message, file=sys.stderr),
            )
            for url in urls
        ]
    except ValueError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    if repeated := duplicate(urls):  # the job file's list is checked when it is read
        print(f"--url {repeated} names a webui given before: give each webui once.", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = run(jobs, args.out, clients)
    except WebuiError as error:
        print(error, file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # during the pre-flight check; run() handles it between jobs
        print(_INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
    print(
        f"{summary.done} done, {summary.failed} failed, {summary.skipped} finished earlier; "
        f"manifest: {args.out / MANIFEST}",
        file=sys.stderr,
    )
    if len(clients) > 1:
        shares = ", ".join(f"{client.label} {summary.servers.get(client.url, 0)}" for client in clients)
        dropped = f"; dropped: {', '.join(summary.dropped)}" if summary.dropped else ""
        print(f"jobs per webui: {shares}{dropped}", file=sys.stderr)
    if summary.interrupted:
        print(_INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary.failed:
        print("Failed jobs run again when you run the same command again.", file=sys.stderr)
        return EXIT_FAILED
    print(f"Report: python -m hidiffusion_lib.batch report {args.out}", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    try:
        paths = write_report(args.out, args.thumb)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(map(str, paths)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run" and (args.retries < 0 or args.backoff < 0 or args.timeout <= 0):
        parser.error("--retries and --backoff must be >= 0 and --timeout > 0")
    if args.command == "report" and args.thumb < 16:
        parser.error("--thumb must be at least 16 pixels")
    return _run(args) if args.command == "run" else _report(args)


if __name__ == "__main__":
    sys.exit(main())
