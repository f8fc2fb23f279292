"""Batch runs on several fake webuis: the jobs shared out, checks before the first job, a webui that dies,
Ctrl-C and resume, the scaling benchmark."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_webui import CHECKPOINT, client_for, fleet

from hidiffusion_lib.batch import __main__ as cli
from hidiffusion_lib.batch.client import Backoff, WebuiError
from hidiffusion_lib.batch.jobfile import JobFileError, load, load_file, server_key
from hidiffusion_lib.batch.manifest import Manifest
from hidiffusion_lib.batch.runner import run
from hidiffusion_lib.batch.scale import measure, table, tiny_jobs
from hidiffusion_lib.batch.servers import checkpoint_ids
from hidiffusion_lib.script_args import ARGS

ROOT = Path(__file__).resolve().parent.parent
FAST = Backoff(retries=1, base=0.01, cap=0.01)


def _jobfile(tmp_path: Path, count: int = 9, extra: str = "") -> Path:
    path = tmp_path / "jobs.yaml"
    seeds = ", ".join(map(str, range(count)))
    path.write_text(f"{extra}jobs:\n  - {{name: s, prompt: a, size: 64, steps: 1, grid: {{seed: [{seeds}]}}}}\n")
    return path


def _done(out: Path) -> list[dict]:
    return [r for r in Manifest(out).records() if r["status"] == "done"]


def _seeds(fake) -> list[int]:
    return [body["seed"] for body in fake.made]


def test_jobs_are_shared_out_and_each_record_names_its_server(tmp_path, capsys):
    out = tmp_path / "out"
    jobs = load(_jobfile(tmp_path, 9))
    with fleet(3, latency=0.03) as fakes:
        summary = run(jobs, out, [client_for(f) for f in fakes], progress=True)
    records = Manifest(out).records()
    assert (summary.done, summary.failed, summary.dropped) == (9, 0, {})
    assert sorted(r["id"] for r in records) == sorted(j.id for j in jobs)  # each job once
    by_server = Counter(r["server"] for r in records)
    assert by_server == {f.url: len(f.made) for f in fakes} == summary.servers
    assert all(len(f.made) >= 1 for f in fakes)  # every webui worked
    assert sorted(s for f in fakes for s in _seeds(f)) == list(range(9))  # requests made == jobs, none twice
    for record in records:  # what a server made is what its record says
        fake = next(f for f in fakes if f.url == record["server"])
        assert record["spec"]["seed"] in _seeds(fake) and (out / record["files"][0]["path"]).exists()
    assert [r["index"] for r in sorted(records, key=lambda r: r["spec"]["seed"])] == list(range(9))
    err = capsys.readouterr().err
    assert f"{fakes[0].url.removeprefix('http://')} busy " in err and " idle" in err and "9/9 jobs | " in err


def test_a_server_dying_mid_job_hands_its_job_to_another(tmp_path, capsys):
    out = tmp_path / "out"
    jobs = load(_jobfile(tmp_path, 8))
    with fleet(2, latency=0.02) as fakes:
        fakes[0].faults = [None, "die"]  # dies on its second job, without answering it
        summary = run(jobs, out, [client_for(f, backoff=FAST) for f in fakes], progress=False)
    lost = fakes[0].generations()[1].body["seed"]
    assert summary.done == 8 and list(summary.dropped) == [fakes[0].url]
    assert "stopped answering" in summary.dropped[fakes[0].url]
    assert (len(fakes[0].made), len(fakes[1].made)) == (1, 7) and lost in _seeds(fakes[1])
    assert Counter(r["server"] for r in Manifest(out).records()) == {fakes[0].url: 1, fakes[1].url: 7}
    assert Manifest(out).finished() == {j.id for j in jobs} and len(Manifest(out).records()) == 8
    err = capsys.readouterr().err
    assert f"{fakes[0].url.removeprefix('http://')} dropped, its job goes to another webui: The webui at" in err


def test_all_servers_gone_exits_1_and_the_next_run_finishes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    out, jobfile = tmp_path / "out", _jobfile(tmp_path, 6)
    options = ["--retries", "1", "--backoff", "0.01"]
    with fleet(2, latency=0.02) as fakes:
        for fake in fakes:
            fake.faults = [None, "die"]
        urls = [arg for f in fakes for arg in ("--url", f.url)]
        assert cli.main(["run", str(jobfile), "--out", str(out), *urls, *options]) == 1
    err = capsys.readouterr().err
    assert err.count("No webui is left to run the jobs on:") == 1
    assert all(f"The webui at {f.url} stopped answering" in err for f in fakes)
    assert len(_done(out)) == 2 and sum(len(f.made) for f in fakes) == 2
    with fleet(2) as fresh:
        urls = [arg for f in fresh for arg in ("--url", f.url)]
        assert cli.main(["run", str(jobfile), "--out", str(out), *urls, *options]) == 0
        assert sum(len(f.made) for f in fresh) == 4
    assert sorted(r["spec"]["seed"] for r in _done(out)) == list(range(6))
    assert "4 done, 0 failed, 2 finished earlier" in capsys.readouterr().err


def _labels_one_short(fake):
    fake.labels = [a.label for a in ARGS[:-1]]


@pytest.mark.parametrize(
    ("extra", "change", "expected"),
    [
        ("", lambda fake: setattr(fake, "checkpoint", "sdxl.safetensors [31e35c80fc]"),
         "The webui at {1} has checkpoint 'sdxl.safetensors [31e35c80fc]' loaded where {0} has "
         f"'{CHECKPOINT}': jobs that pin no checkpoint would run on different models."),
        ("", _labels_one_short,
         f"At {{1}}, the webui's HiDiffusion extension takes {len(ARGS) - 1} arguments where this client sends"),
        ("defaults: {override_settings: {sd_model_checkpoint: sdxl}}\n",
         lambda fake: setattr(fake, "checkpoints", [CHECKPOINT]),
         f"The webui at {{1}} has no checkpoint 'sdxl', which jobs[0] pins in override_settings.sd_model_checkpoint "
         f"(it lists: {CHECKPOINT})"),
    ],
    ids=["loaded checkpoint", "argument table", "pinned checkpoint"],
)
def test_a_mismatch_is_refused_before_any_job(tmp_path, capsys, monkeypatch, extra, change, expected):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    jobfile = _jobfile(tmp_path, 4, extra)
    models = [CHECKPOINT, "sdxl.safetensors [31e35c80fc]"]
    with fleet(2, checkpoints=models) as fakes:
        change(fakes[1])
        args = ["run", str(jobfile), "--out", str(tmp_path / "out"), "--url", fakes[0].url, "--url", fakes[1].url]
        assert cli.main(args) == 1
        assert [len(f.generations()) for f in fakes] == [0, 0]
    assert expected.format(fakes[0].url, fakes[1].url) in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_the_same_file_under_another_folder_or_a_pin_known_to_all_is_accepted(tmp_path):
    jobs = load(_jobfile(tmp_path, 4))
    with fleet(2) as fakes:
        fakes[1].checkpoint = fakes[1].checkpoints[0] = f"SD1/{CHECKPOINT}"  # same hash: the same file
        assert run(jobs, tmp_path / "a", [client_for(f) for f in fakes], progress=False).done == 4
    pinned = load(_jobfile(tmp_path, 4, "defaults: {override_settings: {sd_model_checkpoint: 'sdxl [31e35c80fc]'}}\n"))
    with fleet(2, checkpoints=[CHECKPOINT, "sdxl.safetensors [31e35c80fc]"]) as fakes:
        fakes[1].checkpoint = "other.safetensors"  # loaded checkpoints differ, but every job pins one
        assert run(pinned, tmp_path / "b", [client_for(f) for f in fakes], progress=False).done == 4
    assert {r["info"]["sd_model_name"] for r in Manifest(tmp_path / "b").records()} == {"sdxl"}


def test_checkpoint_ids_from_an_sd_models_entry():
    entry = {"title": "XL/base.safetensors [31e35c80fc]", "model_name": "XL_base", "hash": "31e35c80fc",
             "sha256": "31e35c80fc" + "0" * 54, "filename": "/w/models/Stable-diffusion/XL/base.safetensors"}
    assert checkpoint_ids(entry) == {
        "XL/base.safetensors [31e35c80fc]", "XL/base.safetensors", "base", "XL_base", "31e35c80fc",
        "31e35c80fc" + "0" * 54, "base [31e35c80fc]",
    }
    assert checkpoint_ids({"title": "a.ckpt", "model_name": "a", "hash": None}) == {"a.ckpt", "a"}


def test_a_refused_job_is_recorded_failed_not_sent_to_another_server(tmp_path):
    jobfile = tmp_path / "jobs.yaml"
    jobfile.write_text("defaults: {size: 64, steps: 1}\njobs:\n  - grid: {prompt: [one, bad, three, four]}\n")
    with fleet(2) as fakes:
        for fake in fakes:
            fake.fail_prompts = {"bad"}
        summary = run(load(jobfile), tmp_path / "out", [client_for(f) for f in fakes], progress=False)
        sent = [g.body["prompt"] for f in fakes for g in f.generations()]
    assert (summary.done, summary.failed, summary.dropped) == (3, 1, {})
    assert sorted(sent) == ["bad", "four", "one", "three"]


def test_the_same_job_on_two_servers_gives_the_same_files(tmp_path):
    jobs = load(_jobfile(tmp_path, 4))
    with fleet(2) as (a, b):
        run(jobs, tmp_path / "a", client_for(a), progress=False)
        run(jobs, tmp_path / "b", client_for(b), progress=False)
        run(jobs, tmp_path / "ab", [client_for(a), client_for(b)], progress=False)

    def files(name):
        folder = tmp_path / name
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in (folder / "images").rglob("*.png")}

    assert len(files("a")) == 4 and files("a") == files("b") == files("ab")
    assert {r["server"] for r in Manifest(tmp_path / "b").records()} == {b.url}


def test_ctrl_c_in_a_worker_stops_the_run_and_the_next_run_makes_each_job_once(tmp_path):
    out = tmp_path / "out"
    jobs = load(_jobfile(tmp_path, 8))
    with fleet(2, latency=0.03) as fakes:
        clients = [client_for(f) for f in fakes]
        generate, calls = clients[1].generate, []

        def interrupted_on_the_second(mode, payload):
            calls.append(payload["seed"])
            if len(calls) == 2:
                raise KeyboardInterrupt
            return generate(mode, payload)

        clients[1].generate = interrupted_on_the_second
        summary = run(jobs, out, clients, progress=False)
        assert summary.interrupted and 1 <= summary.done < 8
        first = Manifest(out).records()
        assert len({r["id"] for r in first}) == len(first) == summary.done and all(r["status"] == "done" for r in first)
        time.sleep(0.15)  # the other webui's job in flight is answered meanwhile: not saved, not recorded
        on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png*"))
        assert on_disk == sorted(r["files"][0]["path"] for r in first)
        summary = run(jobs, out, [client_for(f) for f in fakes], progress=False)
    assert (summary.done, summary.skipped, summary.interrupted) == (8 - len(first), len(first), False)
    assert sorted(r["spec"]["seed"] for r in Manifest(out).records()) == list(range(8))


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_sigint_to_the_command_leaves_a_manifest_that_resumes(tmp_path):
    out, jobfile = tmp_path / "out", _jobfile(tmp_path, 12)
    env = os.environ | {"NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    # 3 s of jobs after the third record: on a loaded machine the signal still lands mid-run
    with fleet(2, latency=0.6) as fakes:
        urls = [arg for f in fakes for arg in ("--url", f.url)]
        command = [sys.executable, "-m", "hidiffusion_lib.batch", "run", str(jobfile), "--out", str(out), *urls]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while process.poll() is None and time.monotonic() < deadline:
                if len(Manifest(out).records()) >= 3:
                    break
                time.sleep(0.01)
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=10)
        finally:
            process.kill()
        assert process.returncode == 130, err.decode()
        assert "Interrupted. The manifest is intact: run the same command again to resume." in err.decode()
        lines = (out / "manifest.jsonl").read_text().splitlines()
        first = [json.loads(line) for line in lines]  # every line whole
        assert 3 <= len(first) < 12 and len({r["id"] for r in first}) == len(first)
        assert not list(out.rglob("*.part"))
        assert cli.main(["run", str(jobfile), "--out", str(out), *urls]) == 0
    seeds = [r["spec"]["seed"] for r in Manifest(out).records()]
    assert sorted(seeds) == list(range(12))  # nothing made twice, nothing lost


def test_servers_from_the_job_file_and_url_replacing_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with fleet(2) as fakes:
        listed = f"servers:\n  - {fakes[0].url}\n  - {fakes[1].url}/\n"
        jobfile = _jobfile(tmp_path, 4, listed)
        assert load_file(jobfile).servers == [fakes[0].url, f"{fakes[1].url}/"]
        assert cli.main(["run", str(jobfile), "--out", str(tmp_path / "a")]) == 0
        assert {r["server"] for r in Manifest(tmp_path / "a").records()} == {fakes[0].url, fakes[1].url}
        assert "jobs per webui: " in capsys.readouterr().err
        fakes[0].die()  # gone: only --url's webui is used
        assert cli.main(["run", str(jobfile), "--out", str(tmp_path / "b"), "--url", fakes[1].url]) == 0
        assert {r["server"] for r in Manifest(tmp_path / "b").records()} == {fakes[1].url}


def test_a_webui_given_twice_is_a_usage_error(tmp_path, capsys):
    jobfile = _jobfile(tmp_path, 1)
    args = ["run", str(jobfile), "--out", str(tmp_path / "out"), "--url", "http://127.0.0.1:7861"]
    assert cli.main([*args, "--url", "http://127.0.0.1:7861/"]) == 2
    assert "--url http://127.0.0.1:7861/ names a webui given before: give each webui once." in capsys.readouterr().err
    assert cli.main([*args, "--url", "http://127.0.0.1:port"]) == 2
    assert "--url must have a port number in [0, 65535], got 'http://127.0.0.1:port'" in capsys.readouterr().err
    assert server_key("HTTP://LocalHost/") == server_key("http://localhost:80") != server_key("https://localhost")
    bad = _jobfile(tmp_path, 1, "servers:\n  - http://a:7860\n  - ftp://b\n  - http://a:7860/\n")
    with pytest.raises(JobFileError) as caught:
        load(bad)
    assert caught.value.problems == [
        "servers[1] (line 3): must be an http:// or https:// address such as http://127.0.0.1:7860, got 'ftp://b'",
        "servers[2] (line 4): repeats servers[0] (http://a:7860): give each webui once",
    ]
    assert cli.main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    with pytest.raises(ValueError, match="give each webui once"), fleet(1) as (fake,):
        run(load(jobfile), tmp_path / "out", [client_for(fake), client_for(fake)])


def test_scaling_benchmark_at_a_tiny_size():
    rows = [measure(servers, tiny_jobs(8), 0.1) for servers in (1, 2)]
    assert [(r.servers, r.jobs, r.rounds) for r in rows] == [(1, 8, 8), (2, 8, 4)]
    assert rows[1].throughput / rows[0].throughput > 1.5  # latency-bound: two webuis nearly halve the time
    assert all(0 <= r.overhead < 0.1 and r.seconds >= r.ideal for r in rows)
    lines = table(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 1 | ") and "| 1.00 | 1.00 |" in lines[2]


def test_an_unreachable_server_stops_the_run_before_any_job(tmp_path):
    with fleet(2) as fakes:
        fakes[1].die()
        with pytest.raises(WebuiError, match=f"Cannot reach the webui at {fakes[1].url}"):
            run(load(_jobfile(tmp_path, 2)), tmp_path / "out", [client_for(f) for f in fakes], progress=False)
        assert fakes[0].generations() == []
