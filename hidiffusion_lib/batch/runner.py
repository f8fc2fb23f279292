"""Running jobs against the webui: skip finished ones, save each image, record each job in the manifest."""

from __future__ import annotations

import io
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, PngImagePlugin
from tqdm import tqdm

from .client import Generation, JobError, WebuiClient
from .jobfile import Job, output_size, setting_label
from .manifest import Manifest, write_atomic

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Summary:
    """What a run did; ``interrupted`` is set by Ctrl-C."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: bool = False


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", text).strip("-.") or "job"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _as_png(data: bytes, infotext: str | None) -> tuple[bytes, tuple[int, int]]:
    """PNG bytes and size. PNG is kept byte for byte; JPEG/WebP (the webui's ``samples_format``) is
    converted, with the infotext in the "parameters" text chunk as the webui writes it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if data.startswith(_PNG_SIGNATURE):
                image.verify()
                return data, image.size
            info = PngImagePlugin.PngInfo()
            if infotext:
                info.add_text("parameters", infotext)
            converted = io.BytesIO()
            image.save(converted, format="PNG", pnginfo=info)
            return converted.getvalue(), image.size
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports broken PNGs as SyntaxError
        raise JobError(f"malformed image from the webui: {error}") from None


def _save(job: Job, generation: Generation, out: Path) -> list[dict]:
    width, height = output_size(job.spec)
    folder = Path("images") / _slug(job.spec["name"])
    stem = f"{_slug(setting_label(job.spec))}_{width}x{height}"
    # Every image is checked before any is written: a bad one fails the job with nothing on disk.
    converted = [_as_png(data, text) for data, text in zip(generation.images, generation.infotexts, strict=True)]
    files = []
    for k, ((png, size), seed, infotext) in enumerate(
        zip(converted, generation.seeds, generation.infotexts, strict=True)
    ):
        path = folder / f"{stem}{'' if seed is None else f'_s{seed}'}_{job.id}-{k}.png"
        write_atomic(out / path, png)
        files.append({"path": path.as_posix(), "bytes": len(png), "size": list(size), "seed": seed,
                      "infotext": infotext})
    return files


def _attempt(job: Job, out: Path, client: WebuiClient) -> dict:
    """Run one job; the manifest record of its outcome. WebuiError and KeyboardInterrupt pass through."""
    record = {"id": job.id, "source": job.source, "spec": job.spec}
    started = time.monotonic()
    try:
        try:
            payload = job.request()
        except OSError as error:
            raise JobError(f"cannot read init_image: {error}") from None
        generation = client.generate(job.mode, payload)
        files = _save(job, generation, out)
    except JobError as error:
        return record | {"status": "failed", "error": str(error), "seconds": round(time.monotonic() - started, 3),
                         "finished_at": _now()}
    info = {k: v for k, v in generation.info.items() if k != "infotexts"}  # the infotexts are kept per file
    asked, used = job.spec["sampler"], info.get("sampler_name")
    if asked and used and not asked.startswith(used):  # "DPM++ 2M Karras" runs as "DPM++ 2M"
        # The webui runs its default sampler for a name it does not know, without an error.
        record["warning"] = f"the webui ran sampler {used!r} where the job asks for {asked!r}"
    return record | {
        "status": "done",
        "files": files,
        "seconds": round(generation.seconds, 3),
        "server_seconds": generation.server_seconds,
        "attempts": generation.attempts,
        "finished_at": _now(),
        "info": info,
    }


def describe(job: Job) -> str:
    """One line about a job, for --dry-run and messages."""
    s = job.spec
    width, height = output_size(s)
    prompt = s["prompt"] if len(s["prompt"]) <= 50 else s["prompt"][:49] + "…"
    return (
        f"{job.source:9} {job.id}  {s['name']:12} {s['mode']}  {width}x{height:<5} {setting_label(s):22} "
        f"seed {s['seed']:<6} {s['steps']} steps  {prompt!r}"
    )


def dry_run(jobs: list[Job], out: Path) -> None:
    """List what a run would do, marking the jobs already finished in ``out``."""
    finished = Manifest(out).finished()
    for job in jobs:
        print(f"{'done' if job.id in finished else 'todo'}  {describe(job)}")
    to_run = sum(job.id not in finished for job in jobs)
    print(f"{len(jobs)} jobs: {len(jobs) - to_run} finished in {out}, {to_run} to run.")


def run(jobs: list[Job], out: Path, client: WebuiClient, *, progress: bool = True) -> Summary:
    """Run the jobs not yet finished in ``out``. Ctrl-C stops between two manifest lines and is
    reported in the summary; WebuiError (the webui is unusable) propagates."""
    manifest = Manifest(out)
    finished = manifest.finished()
    todo = [job for job in jobs if job.id not in finished]
    summary = Summary(skipped=len(jobs) - len(todo))
    if not todo:
        return summary
    client.check(img2img=any(job.mode == "img2img" for job in todo))
    bar = tqdm(
        total=sum(job.cost() for job in todo),
        desc="HiDiffusion batch",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    bar.set_postfix_str(f"0/{len(todo)} jobs")
    warned: set[str] = set()
    try:
        for job in todo:
            record = _attempt(job, out, client)
            manifest.append(record)
            if record.get("warning") and record["warning"] not in warned:
                warned.add(record["warning"])
                tqdm.write(f"note: {record['warning']}", file=sys.stderr)
            if record["status"] == "done":
                summary.done += 1
            else:
                summary.failed += 1
                tqdm.write(f"failed: {describe(job)}\n  {record['error']}", file=sys.stderr)
            failed = f", {summary.failed} failed" if summary.failed else ""
            bar.set_postfix_str(f"{summary.done + summary.failed}/{len(todo)} jobs{failed}", refresh=False)
            bar.update(job.cost())
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
    return summary
