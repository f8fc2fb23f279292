"""The batch client against two real AUTOMATIC1111 webuis (v1.10.x) on two loopback ports, skipped
unless WEBUI_DIR is set (see conftest.py): one job file shared by both servers, the same image
whichever server made it, a client killed mid-job and resumed, and a server killed mid-job.

Both webuis load the same tiny random-weight SD 1.x checkpoint; jobs are 2 steps at 576-640 px.
The tests run in file order: the last one kills the second webui.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, needs_webui, running_webui, write_checkpoint

from hidiffusion_lib.batch.__main__ import main
from hidiffusion_lib.batch.manifest import Manifest
from hidiffusion_lib.batch.report import sweeps

pytestmark = needs_webui
JOBS = """\
defaults: {steps: 2, sampler: Euler, cfg_scale: 7}
jobs:
  - name: cube
    prompt: a red cube
    grid:
      seed: [3, 4]
      hidiffusion: ["off", full]
      size: [576x576, 640x640]
"""
JOB_COUNT = 8


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two webuis, each with its own settings files, on the same checkpoint."""
    ckpt = write_checkpoint(tmp_path_factory.mktemp("ckpt"))
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_webui(tmp_path_factory.mktemp(f"webui{k}"), ckpt)) for k in range(2)]


@pytest.fixture(scope="module")
def jobfile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "jobs.yaml"
    path.write_text(JOBS)
    return path


@pytest.fixture(scope="module")
def alone(servers, jobfile, tmp_path_factory) -> Path:
    """The job file run uninterrupted on the first server alone."""
    out = tmp_path_factory.mktemp("alone")
    assert main(["run", str(jobfile), "--url", servers[0].url, "--out", str(out)]) == 0
    return out


def done(out: Path) -> dict[str, dict]:
    records = [r for r in Manifest(out).records() if r.get("status") == "done"]
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(records), "a job was made twice"
    return by_id


def pixels(path: Path) -> str:
    """A digest of the decoded pixels (the PNG's text chunks hold timings that differ)."""
    from PIL import Image

    with Image.open(path) as image:
        return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def images(out: Path) -> dict[str, str]:
    """Every image file of a run (relative path -> pixel digest)."""
    return {p.relative_to(out).as_posix(): pixels(p) for p in sorted(out.glob("images/**/*.png"))}


def report_table(out: Path) -> list:
    """The report's content without timings: per sweep, its settings, sizes and each cell's files."""
    return [(s.title, s.settings, s.sizes, sorted((key, [f["path"] for f in cell.files], cell.done)
                                                  for key, cell in s.cells.items()))
            for s in sweeps(Manifest(out))]


def busy(url: str) -> bool:
    """Whether the webui at ``url`` is sampling now (its progress endpoint)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/sdapi/v1/progress?skip_current_image=true", timeout=10) as response:
        state = json.load(response)
    return state["progress"] > 0 or state["state"]["sampling_step"] > 0


def wait_until(condition, timeout: float = 600, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_two_servers_share_the_jobs_and_agree_with_one(servers, jobfile, alone, tmp_path):
    urls = [s.url for s in servers]
    out = tmp_path / "both"
    assert main(["run", str(jobfile), "--url", urls[0], "--url", urls[1], "--out", str(out)]) == 0
    records = done(out)
    assert len(records) == JOB_COUNT
    used = {r["server"] for r in records.values()}
    assert used == set(urls), f"servers used: {used}"
    # the same job gives the same image whichever server made it
    assert images(out) == images(alone)
    assert report_table(out) == report_table(alone)
    made_by_second = [r for r in records.values() if r["server"] == urls[1]]
    assert made_by_second and all(f["path"] in images(alone) for r in made_by_second for f in r["files"])


def test_client_killed_mid_job_resumes_with_nothing_lost_or_doubled(servers, jobfile, alone, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "hidiffusion_lib.batch", "run", str(jobfile), "--url", servers[0].url,
               "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    client = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # after two jobs are recorded, while the third is being made
        wait_until(lambda: len(done(out)) >= 2 if (out / "manifest.jsonl").exists() else False, what="2 jobs")
        wait_until(lambda: busy(servers[0].url), what="the third job to start")
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
    killed_at = len(done(out))
    assert 2 <= killed_at < JOB_COUNT, f"{killed_at} jobs were done when the client was killed"
    wait_until(lambda: not busy(servers[0].url), what="the webui to finish the orphaned job")
    # resumed on both servers
    assert main(["run", str(jobfile), "--url", servers[0].url, "--url", servers[1].url, "--out", str(out)]) == 0
    assert len(done(out)) == JOB_COUNT
    assert images(out) == images(alone)
    assert not list(out.rglob("*.part"))
    assert report_table(out) == report_table(alone)


def test_server_killed_mid_job_has_its_job_made_on_the_other(servers, jobfile, alone, tmp_path):
    """Last in the module: it kills the second webui."""
    urls = [s.url for s in servers]
    out = tmp_path / "server-killed"
    result = {}

    def run() -> None:
        result["status"] = main(["run", str(jobfile), "--url", urls[0], "--url", urls[1], "--out", str(out),
                                 "--retries", "1", "--backoff", "0.5"])

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: busy(urls[1]), what="the second webui to start a job")
    servers[1].kill_group()
    thread.join(timeout=1800)
    assert not thread.is_alive()
    assert result["status"] == 0
    records = done(out)
    assert len(records) == JOB_COUNT
    assert images(out) == images(alone)
    assert report_table(out) == report_table(alone)
    assert {r["server"] for r in records.values()} <= set(urls)
