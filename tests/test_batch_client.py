"""The batch client against the fake webui: pre-flight check, auth, HTTPS, retries, refusals."""

import base64
import json
import socket

import pytest
from fake_webui import FakeWebui, client_for, script_info_entry

from hidiffusion_lib.batch.client import Backoff, JobError, WebuiClient, WebuiError, parse_auth
from hidiffusion_lib.script_args import ARGS, defaults

BODY = {"prompt": "a", "width": 64, "height": 64, "steps": 2, "seed": 5,
        "alwayson_scripts": {"HiDiffusion": {"args": defaults()}}}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_check_passes_against_a_webui_with_the_extension():
    with FakeWebui() as fake:
        client_for(fake).check(img2img=True)
        assert [r.path for r in fake.requests] == ["/sdapi/v1/script-info"]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"api": False}, "answers but its API is off: restart it with the --api flag."),
        ({"installed": False}, "The HiDiffusion extension is not loaded in the webui at"),
        ({"labels": [a.label for a in ARGS[:-1]]},
         f"extension takes {len(ARGS) - 1} arguments where this client sends {len(ARGS)}: update the extension"),
        ({"labels": ["Enable", *(a.label for a in ARGS[1:])]},
         "names argument 0 'Enable' where this client expects 'HiDiffusion'"),
    ],
)
def test_check_failures_say_what_to_do(options, expected):
    with FakeWebui(**options) as fake, pytest.raises(WebuiError, match=expected.replace("(", r"\(")):
        client_for(fake).check()


def test_check_names_img2img_when_only_that_is_missing():
    with FakeWebui() as fake:
        fake._route = lambda *a: (200, [script_info_entry(is_img2img=False)])
        client = client_for(fake)
        client.check()
        with pytest.raises(WebuiError, match=r"not loaded in the webui at .* for img2img"):
            client.check(img2img=True)


def test_unreachable_webui():
    client = WebuiClient(f"http://127.0.0.1:{_closed_port()}")
    client.session.trust_env = False
    with pytest.raises(WebuiError, match=r"^Cannot reach the webui at .*: start it with --api"):
        client.check()


def test_not_a_webui():
    with FakeWebui() as fake:
        fake._route = lambda *a: (200, {"hello": "world"})
        with pytest.raises(WebuiError, match=r"not like the webui API .*check --url"):
            client_for(fake).check()


def test_auth_is_sent_as_http_basic_and_required():
    with FakeWebui(auth=("user", "p:ss")) as fake:
        with pytest.raises(WebuiError, match="requires API credentials: pass --api-auth USER:PASS"):
            client_for(fake).check()
        with pytest.raises(WebuiError, match="rejected the --api-auth credentials"):
            client_for(fake, auth=("user", "wrong")).check()
        client = client_for(fake, auth=parse_auth("user:p:ss"))
        client.check()
        client.generate("txt2img", BODY)
        assert fake.requests[-1].headers["Authorization"] == "Basic " + base64.b64encode(b"user:p:ss").decode()


def test_parse_auth_and_url_scheme():
    assert parse_auth("a:b:c") == ("a", "b:c")
    with pytest.raises(ValueError, match="USER:PASS"):
        parse_auth("nocolon")
    with pytest.raises(ValueError, match="http:// or https://"):
        WebuiClient("ftp://127.0.0.1:7860")
    with pytest.raises(ValueError, match="http:// or https://"):
        WebuiClient("127.0.0.1:7860")
    assert WebuiClient("https://127.0.0.1:7860/", verify=False).url == "https://127.0.0.1:7860"


def test_https_to_a_plain_http_server_is_a_tls_error_with_advice():
    with FakeWebui() as fake:
        client = client_for(fake)
        client.url = client.url.replace("http://", "https://")
        with pytest.raises(WebuiError, match=r"TLS with https://127\.0\.0\.1:.* failed .*--insecure"):
            client.check()


def test_generate_returns_png_bytes_seeds_infotexts_and_timings():
    with FakeWebui() as fake:
        generation = client_for(fake).generate("txt2img", BODY | {"batch_size": 2})
    assert len(generation.images) == 2 and all(i.startswith(b"\x89PNG") for i in generation.images)
    assert generation.seeds == [5, 6]
    assert generation.infotexts[1].endswith("Seed: 6, Size: 64x64")
    assert generation.attempts == 1 and generation.server_seconds is not None and generation.seconds > 0


def test_a_returned_grid_is_skipped():
    with FakeWebui() as fake:
        processed = fake._processed

        def with_grid(request, sampler, hidiffusion):
            result = processed(request, sampler, hidiffusion)
            info = json.loads(result["info"])
            result["images"].insert(0, result["images"][0])
            info |= {"index_of_first_image": 1, "infotexts": ["grid", *info["infotexts"]]}
            result["info"] = json.dumps(info)
            return result

        fake._processed = with_grid
        generation = client_for(fake).generate("txt2img", BODY)
    assert generation.seeds == [5] and len(generation.images) == 1 and generation.infotexts[0] != "grid"


def test_connection_drops_and_503_are_retried_with_backoff():
    messages = []
    with FakeWebui() as fake:
        fake.faults = ["drop", "503", "drop"]
        client = client_for(fake, backoff=Backoff(retries=3, base=0.01, cap=0.02), on_retry=messages.append)
        generation = client.generate("txt2img", BODY)
    assert generation.attempts == 4 and len(fake.generations()) == 4
    assert [m.split("; ")[1] for m in messages] == ["retry 1/3 in 0.01 s", "retry 2/3 in 0.02 s", "retry 3/3 in 0.02 s"]
    assert "HTTP 503" in messages[1]


def test_a_restarting_webui_is_waited_for():
    with FakeWebui() as fake:
        fake.faults = ["restart"]
        fake.restart_seconds = 0.2
        client = client_for(fake, backoff=Backoff(retries=10, base=0.02, cap=0.1))
        assert client.generate("txt2img", BODY).seeds == [5]
        assert len(fake.generations()) >= 2


def test_retries_give_up_with_advice():
    with FakeWebui() as fake:
        fake.faults = ["drop"] * 3
        with pytest.raises(WebuiError, match=r"stopped answering .* after 3 attempts: start it again, then run"):
            client_for(fake, backoff=Backoff(retries=2, base=0.01)).generate("txt2img", BODY)


def test_a_timeout_fails_the_job_without_sending_it_again():
    with FakeWebui() as fake:
        fake.faults = ["slow"]
        fake.slow_seconds = 0.5
        with pytest.raises(JobError, match=r"no answer within 0.1 s \(raise --timeout"):
            client_for(fake, timeout=0.1).generate("txt2img", BODY)
        assert len(fake.generations()) == 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"faults": ["malformed"]}, "malformed response from the webui: JSONDecodeError"),
        ({"faults": ["no-images"]}, "malformed response from the webui: KeyError: 'images'"),
        ({"fail_prompts": {"a"}}, "HTTP 500: RuntimeError: CUDA out of memory"),
    ],
)
def test_refusals_and_malformed_answers_fail_the_job(change, expected):
    with FakeWebui() as fake:
        for key, value in change.items():
            setattr(fake, key, value)
        with pytest.raises(JobError, match=expected):
            client_for(fake).generate("txt2img", BODY)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (BODY | {"steps": "many"}, "HTTP 422: body.steps: value is not a valid integer"),
        (BODY | {"alwayson_scripts": {"HiDiffusionX": {}}}, "HTTP 422: Script 'HiDiffusionX' not found"),
        (BODY | {"alwayson_scripts": {"HiDiffusion": {"args": ["yes"]}}}, r"HTTP \d+: ArgError: .*'enabled'.*'yes'"),
    ],
)
def test_webui_error_details_reach_the_message(body, expected):
    with FakeWebui() as fake, pytest.raises(JobError, match=expected):
        client_for(fake).generate("txt2img", body)


def test_img2img_refusals():
    with FakeWebui() as fake:
        with pytest.raises(JobError, match="HTTP 404: Init image not found"):
            client_for(fake).generate("img2img", BODY)
        with pytest.raises(JobError, match="HTTP 500: Invalid encoded image"):
            client_for(fake).generate("img2img", BODY | {"init_images": ["bm90IGFuIGltYWdl"]})
