"""Batch runs against the fake webui: saving, manifest, resume, failures, restarts, Ctrl-C, kill, CLI."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_webui import FakeWebui, client_for
from PIL import Image

from hidiffusion_lib.batch import __main__ as cli
from hidiffusion_lib.batch.client import Backoff, WebuiError
from hidiffusion_lib.batch.jobfile import load
from hidiffusion_lib.batch.manifest import Manifest
from hidiffusion_lib.batch.runner import run

ROOT = Path(__file__).resolve().parent.parent
SWEEP = """\
jobs:
  - name: tiny
    prompt: a lighthouse
    seed: 3
    steps: 2
    grid:
      size: [64, 96]
      hidiffusion: ["off", RAU-Net, full]
"""


@pytest.fixture
def jobfile(tmp_path: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    return path


def _run(fake: FakeWebui, jobfile: Path, out: Path, **options):
    return run(load(jobfile), out, client_for(fake, **options), progress=False)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_run_saves_the_webui_pngs_unchanged_and_records_them(jobfile, tmp_path):
    out = tmp_path / "out"
    with FakeWebui() as fake:
        client = client_for(fake)
        returned = []
        generate = client.generate
        client.generate = lambda mode, payload: returned.append(generate(mode, payload)) or returned[-1]
        summary = run(load(jobfile), out, client, progress=False)
    assert (summary.done, summary.failed, summary.skipped, summary.interrupted) == (6, 0, 0, False)
    records = _lines(out)
    assert [r["status"] for r in records] == ["done"] * 6
    assert [r["id"] for r in records] == [j.id for j in load(jobfile)]
    for record, generation in zip(records, returned, strict=True):
        (file,) = record["files"]
        path = out / file["path"]
        assert path.read_bytes() == generation.images[0]
        assert file["bytes"] == path.stat().st_size and file["seed"] == 3
        with Image.open(path) as image:
            assert image.text["parameters"] == file["infotext"]
            assert list(image.size) == file["size"] == record["spec"]["size"]
        assert record["attempts"] == 1 and record["seconds"] > 0 and record["server_seconds"] is not None
        assert record["info"]["all_seeds"] == [3] and "infotexts" not in record["info"]
    assert sorted(p.name for p in (out / "images" / "tiny").iterdir())[0].startswith("RAU-Net_64x64_s3_")
    assert not list(out.rglob("*.part"))


def test_a_second_run_skips_finished_jobs_without_calling_the_webui(jobfile, tmp_path):
    out = tmp_path / "out"
    with FakeWebui() as fake:
        _run(fake, jobfile, out)
        before = len(fake.requests)
        summary = _run(fake, jobfile, out)
        assert (summary.done, summary.skipped) == (0, 6) and len(fake.requests) == before


def test_a_half_written_file_or_record_is_not_taken_as_finished(jobfile, tmp_path):
    out = tmp_path / "out"
    with FakeWebui() as fake:
        _run(fake, jobfile, out)
        records = _lines(out)
        truncated = out / records[0]["files"][0]["path"]
        truncated.write_bytes(truncated.read_bytes()[:20])  # as a copy cut short
        (out / (records[1]["files"][0]["path"] + ".part")).write_bytes(b"\x89PNG")  # a kill while writing
        manifest = out / "manifest.jsonl"
        lines = manifest.read_text().splitlines(keepends=True)
        # the last job's record cut short by a kill while appending it
        manifest.write_text("".join(lines[:-1]) + lines[-1][:40])
        posted = len(fake.generations())
        summary = _run(fake, jobfile, out)
        assert (summary.done, summary.skipped) == (2, 4) and len(fake.generations()) == posted + 2
    redone = [r["id"] for r in Manifest(out).records()][5:]
    assert redone == [records[0]["id"], records[5]["id"]]
    assert truncated.stat().st_size == records[0]["files"][0]["bytes"]
    assert Manifest(out).finished() == {r["id"] for r in records}


def test_one_bad_job_is_recorded_as_failed_and_the_rest_go_on(tmp_path):
    jobfile = tmp_path / "jobs.yaml"
    jobfile.write_text("defaults: {size: 64, steps: 2}\njobs:\n  - grid: {prompt: [one, bad, three]}\n")
    out = tmp_path / "out"
    with FakeWebui() as fake:
        fake.fail_prompts = {"bad"}
        summary = _run(fake, jobfile, out)
        assert (summary.done, summary.failed) == (2, 1)
        failed = _lines(out)[1]
        assert failed["status"] == "failed" and failed["spec"]["prompt"] == "bad"
        assert failed["error"] == "HTTP 500: RuntimeError: CUDA out of memory (fake)"
        fake.fail_prompts = set()
        summary = _run(fake, jobfile, out)  # the failed job runs again, the others are kept
        assert (summary.done, summary.failed, summary.skipped) == (1, 0, 2)


def test_an_unknown_sampler_is_noted_once(tmp_path, capsys):
    jobfile = tmp_path / "jobs.yaml"
    jobfile.write_text("jobs:\n  - {prompt: a, size: 64, sampler: Eular, grid: {seed: [1, 2]}}\n"
                       "  - {prompt: b, size: 64, sampler: Euler a}\n")
    out = tmp_path / "out"
    with FakeWebui() as fake:
        assert _run(fake, jobfile, out).done == 3
    warnings = [r.get("warning") for r in _lines(out)]
    assert warnings == ["the webui ran sampler 'DPM++ 2M' where the job asks for 'Eular'"] * 2 + [None]
    assert capsys.readouterr().err.count("note: the webui ran sampler") == 1


def test_a_png_cut_short_fails_its_job_and_writes_nothing(jobfile, tmp_path):
    out = tmp_path / "out"
    with FakeWebui() as fake:
        fake.faults = ["cut-png"]
        summary = _run(fake, jobfile, out)
    assert (summary.done, summary.failed) == (5, 1)
    failed = _lines(out)[0]
    assert failed["status"] == "failed" and failed["error"].startswith("malformed image from the webui: ")
    assert len(list(out.rglob("*.png"))) == 5 and not list(out.rglob("*.part"))


def test_a_webui_restart_mid_run_is_retried(jobfile, tmp_path):
    out = tmp_path / "out"
    with FakeWebui() as fake:
        fake.faults = [None, None, "restart"]
        fake.restart_seconds = 0.2
        summary = _run(fake, jobfile, out, backoff=Backoff(retries=10, base=0.02, cap=0.1))
    assert summary.done == 6 and [r["attempts"] for r in _lines(out)][2] > 1


def test_a_webui_that_stays_away_stops_the_run_with_the_manifest_intact(jobfile, tmp_path):
    out = tmp_path / "out"
    with FakeWebui() as fake:
        fake.faults = [None] + ["drop"] * 3
        with pytest.raises(WebuiError, match="run the same command to resume"):
            _run(fake, jobfile, out, backoff=Backoff(retries=2, base=0.01))
    assert [r["status"] for r in _lines(out)] == ["done"]


def test_ctrl_c_stops_between_jobs_and_the_next_run_resumes(jobfile, tmp_path):
    out = tmp_path / "out"
    with FakeWebui() as fake:
        client = client_for(fake)
        generate = client.generate
        calls = []

        def interrupted_on_the_third(mode, payload):
            calls.append(mode)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return generate(mode, payload)

        client.generate = interrupted_on_the_third
        summary = run(load(jobfile), out, client, progress=False)
        assert summary.interrupted and summary.done == 2
        assert [r["status"] for r in _lines(out)] == ["done", "done"]
        summary = _run(fake, jobfile, out)
        assert (summary.done, summary.skipped) == (4, 2)


def test_jpeg_images_are_saved_as_png_with_the_infotext(jobfile, tmp_path):
    out = tmp_path / "out"
    with FakeWebui(image_format="JPEG") as fake:
        _run(fake, jobfile, out)
    file = _lines(out)[0]["files"][0]
    with Image.open(out / file["path"]) as image:
        assert image.format == "PNG" and image.text["parameters"] == file["infotext"]


def test_kill_mid_job_then_resume(jobfile, tmp_path):
    """A real kill (SIGKILL on POSIX) of the command while the webui works on the third job."""
    out = tmp_path / "out"
    env = os.environ | {"NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    with FakeWebui() as fake:
        fake.hold, fake.hold_after = threading.Event(), 2
        command = [sys.executable, "-m", "hidiffusion_lib.batch", "run", str(jobfile), "--out", str(out),
                   "--url", fake.url, "--retries", "0"]
        log = tmp_path / "stderr.txt"
        with open(log, "wb") as stderr:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 20
            while len(fake.generations()) < 3 and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(fake.generations()) == 3, log.read_text()
        finally:
            process.kill()
            process.wait()
        fake.hold.set()
        assert [r["status"] for r in _lines(out)] == ["done", "done"]
        assert cli.main(["run", str(jobfile), "--out", str(out), "--url", fake.url, "--retries", "0"]) == 0
        assert len(fake.generations()) == 3 + 4
    assert Manifest(out).finished() == {j.id for j in load(jobfile)}


def test_cli_dry_run_lists_jobs_without_contacting_the_webui(jobfile, tmp_path, capsys):
    out = tmp_path / "out"
    with FakeWebui() as fake:
        _run(fake, jobfile, out)
        Manifest(out).append({"id": _lines(out)[0]["id"], "status": "failed", "spec": {}})
        before = len(fake.requests)
        assert cli.main(["run", str(jobfile), "--out", str(out), "--url", fake.url, "--dry-run"]) == 0
        assert len(fake.requests) == before
    lines = capsys.readouterr().out.splitlines()
    assert [line[:4] for line in lines[:-1]] == ["todo"] + ["done"] * 5
    assert "jobs[0]" in lines[0] and "tiny" in lines[0] and "64x64" in lines[0] and "off" in lines[0]
    assert lines[-1] == f"6 jobs: 5 finished in {out}, 1 to run."


def test_cli_exit_codes_and_messages(jobfile, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    out = tmp_path / "out"
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs:\n  - prompt: a\n    steps: -1\n")
    assert cli.main(["run", str(bad), "--out", str(out)]) == 2
    assert "jobs[0].steps (line 3): must be an integer in [1, 1000], got -1" in capsys.readouterr().err
    with FakeWebui(auth=("u", "p")) as fake:
        assert cli.main(["run", str(jobfile), "--out", str(out), "--url", fake.url]) == 1
        assert "requires API credentials" in capsys.readouterr().err
        monkeypatch.setenv("WEBUI_API_AUTH", "u:p")
        monkeypatch.setattr(cli.WebuiClient, "generate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        assert cli.main(["run", str(jobfile), "--out", str(out), "--url", fake.url]) == 130
        assert "Interrupted. The manifest is intact: run the same command again to resume." in capsys.readouterr().err
        secure = fake.url.replace("http://", "https://")
        assert cli.main(["run", str(jobfile), "--out", str(out), "--url", secure, "--insecure"]) == 1
        assert "TLS with https://127.0.0.1" in capsys.readouterr().err  # the scheme is accepted, TLS is tried
    assert cli.main(["run", str(jobfile), "--out", str(out), "--url", "ftp://x"]) == 2
    with pytest.raises(SystemExit) as caught:
        cli.main(["run", str(jobfile), "--out", str(out), "--retries", "-1"])
    assert caught.value.code == 2 and "--retries and --backoff must be >= 0" in capsys.readouterr().err


def test_cli_insecure_turns_off_certificate_verification(jobfile, tmp_path, monkeypatch):
    seen = {}

    def fake_run(jobs, out, clients, **kw):  # the CLI passes the list of its --url clients
        seen["verify"] = [client.session.verify for client in clients]
        raise WebuiError("stop here")

    monkeypatch.setattr(cli, "run", fake_run)
    cli.main(["run", str(jobfile), "--out", str(tmp_path), "--url", "https://127.0.0.1:1", "--insecure"])
    assert seen == {"verify": [False]}
    cli.main(["run", str(jobfile), "--out", str(tmp_path), "--url", "https://127.0.0.1:1"])
    assert seen == {"verify": [True]}
