"""The fake webui API of the batch client's tests: ``hidiffusion_lib.batch.fake_api`` (it lives in the
package because the scaling benchmark uses it too), with a client of tiny backoff."""

from hidiffusion_lib.batch.client import Backoff, WebuiClient
from hidiffusion_lib.batch.fake_api import CHECKPOINT, FakeWebui, Received, fleet, loopback_client, script_info_entry

__all__ = ["CHECKPOINT", "FakeWebui", "Received", "client_for", "fleet", "script_info_entry"]


def client_for(fake: FakeWebui, **options) -> WebuiClient:
    """A client of ``fake`` with tiny backoff that ignores proxy settings: traffic stays on 127.0.0.1."""
    options.setdefault("backoff", Backoff(retries=3, base=0.01, cap=0.05))
    return loopback_client(fake.url, **options)
