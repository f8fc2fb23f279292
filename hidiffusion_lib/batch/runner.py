"""Running jobs on one webui or several: skip finished ones, save each image, record each job in the manifest.

Each webui gets a worker thread that runs one job at a time and saves its images. The main thread
hands out the jobs, appends the manifest (the one record, so nothing else writes it) and shows the
progress. A webui that stops answering is dropped and its job goes back to the queue for another;
a job the webui refuses is recorded as failed, as with one webui.
"""

from __future__ import annotations

import io
import queue
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, PngImagePlugin
from tqdm import tqdm

from .client import Generation, JobError, WebuiClient, WebuiError
from .jobfile import Job, output_size, setting_label
from .manifest import Manifest, write_atomic
from .servers import check_servers, duplicate

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Summary:
    """What a run did; ``interrupted`` is set by Ctrl-C. ``servers``: jobs recorded per webui address;
    ``dropped``: the webuis that stopped answering, with the reason."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: bool = False
    servers: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


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


class _Abandoned(Exception):
    """The run stopped while the webui worked on this job: its result is not kept."""


class _Worker:
    """The thread of one webui: runs the jobs put in ``inbox`` one at a time and posts each outcome to
    ``events``: ("record", worker, record), ("lost", worker, WebuiError), ("crash", worker, exception),
    or ("retrying", worker, message) while the client retries."""

    def __init__(self, client: WebuiClient, out: Path, events: queue.SimpleQueue, stop: threading.Event):
        self.client = client
        self.out = out
        self.events = events
        self.stop = stop
        self.inbox: queue.SimpleQueue[tuple[int, Job] | None] = queue.SimpleQueue()
        # Held while the images are written, so that the run waits for a save under way before returning:
        # a result that arrives after that is dropped, never half saved.
        self.saving = threading.Lock()
        self.on_retry = client.on_retry
        client.on_retry = self._retrying
        # A daemon: Ctrl-C abandons a request in flight instead of waiting for the webui.
        threading.Thread(target=self._loop, name=f"batch {client.label}", daemon=True).start()

    def _retrying(self, message: str) -> None:
        self.events.put(("retrying", self, message))
        self.on_retry(message)

    def _loop(self) -> None:
        while (item := self.inbox.get()) is not None:
            try:
                record = _attempt(*item, self.out, self.client, self)
            except _Abandoned:
                return
            except WebuiError as error:
                self.events.put(("lost", self, error))
                return
            except BaseException as error:  # raised again in the main thread
                self.events.put(("crash", self, error))
                return
            self.events.put(("record", self, record))

    def close(self) -> None:
        """No more jobs; returns once no save is under way."""
        self.inbox.put(None)
        with self.saving:
            pass
        self.client.on_retry = self.on_retry


def _attempt(index: int, job: Job, out: Path, client: WebuiClient, worker: _Worker) -> dict:
    """Run one job (``index``: its position in the job file); the manifest record of its outcome.
    WebuiError and KeyboardInterrupt pass through; _Abandoned when the run stopped while the webui
    worked on it."""
    # The index keeps the report in job-file order: with several webuis the records come in any order.
    record = {"id": job.id, "index": index, "source": job.source, "server": client.url, "spec": job.spec}
    started = time.monotonic()
    try:
        try:
            payload = job.request()
        except OSError as error:
            raise JobError(f"cannot read init_image: {error}") from None
        generation = client.generate(job.mode, payload)
        with worker.saving:
            if worker.stop.is_set():
                raise _Abandoned
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


class _Board:
    """The progress bar: jobs recorded, and with several webuis what each one does (busy with a job,
    idle, retrying, dropped)."""

    def __init__(self, clients: Sequence[WebuiClient], todo: list[Job], progress: bool):
        self.total = len(todo)
        self.recorded = self.failed = 0
        self.states = {client.label: "idle" for client in clients} if len(clients) > 1 else {}
        self.bar = tqdm(
            total=sum(job.cost() for job in todo),
            desc="HiDiffusion batch",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
        )
        self._show()

    def _show(self, refresh: bool = True) -> None:
        text = f"{self.recorded}/{self.total} jobs" + (f", {self.failed} failed" if self.failed else "")
        if self.states:
            text += " | " + ", ".join(f"{label} {state}" for label, state in self.states.items())
        self.bar.set_postfix_str(text, refresh=refresh)

    def state(self, client: WebuiClient, state: str) -> None:
        if client.label in self.states and self.states[client.label] != state:
            self.states[client.label] = state
            self._show()

    def recorded_job(self, job: Job, failed: bool) -> None:
        self.recorded += 1
        self.failed += failed
        self._show(refresh=False)
        self.bar.update(job.cost())

    def close(self) -> None:
        self.bar.close()


def run(
    jobs: list[Job], out: Path, clients: WebuiClient | Sequence[WebuiClient], *, progress: bool = True
) -> Summary:
    """Run the jobs not yet finished in ``out`` on ``clients`` (one webui or several, which share the
    jobs, one job at a time each); ``progress`` shows the bar. Every webui is checked first
    (check_servers). Ctrl-C stops between two manifest lines and is reported in the summary;
    WebuiError (no webui left that answers, or a check failed) propagates."""
    clients = [clients] if isinstance(clients, WebuiClient) else list(clients)
    if not clients or (repeated := duplicate([client.url for client in clients])):
        raise ValueError(f"give each webui once: {repeated}" if clients else "no webui to run on")
    manifest = Manifest(out)
    finished = manifest.finished()
    todo = [job for job in jobs if job.id not in finished]
    summary = Summary(skipped=len(jobs) - len(todo))
    if not todo:
        return summary
    check_servers(clients, todo)
    index = {job.id: i for i, job in enumerate(jobs)}
    board = _Board(clients, todo, progress)
    events: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    workers: list[_Worker] = []
    pending, busy = deque(todo), {}
    warned: set[str] = set()
    try:
        workers += [_Worker(client, out, events, stop) for client in clients]
        idle = deque(workers)
        while pending or busy:
            while pending and idle:
                worker, job = idle.popleft(), pending.popleft()
                busy[worker] = job
                worker.inbox.put((index[job.id], job))
                board.state(worker.client, f"busy {job.id[:6]}…")
            try:
                # A timeout, so that Ctrl-C reaches this thread on every platform.
                kind, worker, value = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "retrying":
                board.state(worker.client, "retrying")
                continue
            if kind == "crash":  # KeyboardInterrupt from a callback, or a bug: as it would with one thread
                raise value
            job = busy.pop(worker)
            if kind == "lost":
                pending.appendleft(job)  # made next, by the first webui free
                summary.dropped[worker.client.url] = str(value)
                board.state(worker.client, "dropped")
                if not idle and not busy:
                    raise value if len(clients) == 1 else WebuiError(
                        "No webui is left to run the jobs on:\n  " + "\n  ".join(summary.dropped.values())
                    )
                tqdm.write(f"{worker.client.label} dropped, its job goes to another webui: {value}", file=sys.stderr)
                continue
            manifest.append(value)
            summary.servers[worker.client.url] = summary.servers.get(worker.client.url, 0) + 1
            idle.append(worker)
            if not pending:  # else it is busy again at once
                board.state(worker.client, "idle")
            if value.get("warning") and value["warning"] not in warned:
                warned.add(value["warning"])
                tqdm.write(f"note: {value['warning']}", file=sys.stderr)
            if value["status"] == "done":
                summary.done += 1
            else:
                summary.failed += 1
                tqdm.write(f"failed: {describe(job)}\n  {value['error']}", file=sys.stderr)
            board.recorded_job(job, value["status"] != "done")
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        stop.set()
        for worker in workers:
            worker.close()
        board.close()
    return summary
