"""Several webuis for one run: the checks before the first job, so that every server makes the same images.

Each webui must take the jobs (``WebuiClient.check``: API on, HiDiffusion installed with the argument
table of this client, hence of the same version everywhere). A checkpoint a job pins
(``override_settings.sd_model_checkpoint``) must be on every webui: the webui skips an unknown one
without an error and runs its loaded checkpoint. Jobs that pin none run on the loaded checkpoint,
which must then be the same on every webui.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .client import WebuiClient, WebuiError
from .jobfile import Job, server_key

_HASH = re.compile(r"^(.*) \[([0-9a-fA-F]+)\]$")


def duplicate(urls: Sequence[str]) -> str | None:
    """The first address that names the same webui as an earlier one, or None."""
    seen = set()
    for url in urls:
        key = server_key(url)
        if key in seen:
            return url
        seen.add(key)
    return None


def checkpoint_ids(entry: dict) -> set[str]:
    """The names a job can pin a checkpoint by, from its ``/sdapi/v1/sd-models`` entry: those of the
    webui's ``CheckpointInfo.ids`` that the entry shows (title, file name with and without folder and
    extension, with and without hash, model_name, short hash, sha256)."""
    title, shorthash = entry.get("title"), entry.get("hash")
    name = title
    if isinstance(title, str) and (match := _HASH.match(title)):
        name, shorthash = match[1], shorthash or match[2]
    filename = entry.get("filename") if isinstance(entry.get("filename"), str) else name
    stem = re.split(r"[/\\]", filename or "")[-1].rsplit(".", 1)[0] or None
    ids = {title, name, stem, entry.get("model_name"), entry.get("sha256"), shorthash}
    if shorthash:
        ids |= {f"{name} [{shorthash}]", f"{stem} [{shorthash}]"}
    return {i for i in ids if isinstance(i, str) and i}


def _same_checkpoint(a: str, b: str) -> bool:
    """Titles ``name [shorthash]``: the same file when the hashes agree, even under other folders or names."""
    hash_a, hash_b = _HASH.match(a), _HASH.match(b)
    if hash_a and hash_b:
        return hash_a[2].lower() == hash_b[2].lower()
    return a == b


def check_servers(clients: Sequence[WebuiClient], jobs: Sequence[Job]) -> None:
    """Before any job runs: raise WebuiError, naming the webui and what differs, unless every one of
    ``clients`` can run ``jobs`` (the jobs still to run) and would make the same images."""
    for client in clients:
        client.check(img2img=any(job.mode == "img2img" for job in jobs))
    pinned: dict[str, str] = {}  # checkpoint -> the first job that pins it
    for job in jobs:
        if job.checkpoint:
            pinned.setdefault(job.checkpoint, job.source)
    if pinned:
        for client in clients:
            listed = client.checkpoints()
            known = set().union(*map(checkpoint_ids, listed))
            for name, source in pinned.items():
                if name not in known:
                    titles = ", ".join(str(m.get("title")) for m in listed[:5]) + (", ..." if len(listed) > 5 else "")
                    raise WebuiError(
                        f"The webui at {client.url} has no checkpoint {name!r}, which {source} pins in "
                        f"override_settings.sd_model_checkpoint (it lists: {titles or 'none'}); the webui would "
                        "run its loaded checkpoint instead. Put the checkpoint in its models folder, "
                        "correct the name, or leave that server out."
                    )
    if len(clients) > 1 and any(job.checkpoint is None for job in jobs):
        loaded = [(client, client.loaded_checkpoint()) for client in clients]
        known = [(client, name) for client, name in loaded if name is not None]
        for client, name in known[1:]:
            first, first_name = known[0]
            if not _same_checkpoint(name, first_name):
                raise WebuiError(
                    f"The webui at {client.url} has checkpoint {name!r} loaded where {first.url} has "
                    f"{first_name!r}: jobs that pin no checkpoint would run on different models. Load the "
                    "same checkpoint in every webui, or pin one with override_settings: "
                    "{sd_model_checkpoint: ...} in the job file."
                )
