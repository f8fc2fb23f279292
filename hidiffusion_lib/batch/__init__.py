"""Batch HiDiffusion sweeps against a running webui (``--api``): ``python -m hidiffusion_lib.batch``.

jobfile: the job file's schema and grid expansion; client: the webui API; servers: the checks that
several webuis can share a run; manifest: the output directory's record; runner: run and resume, on
one webui or several; report: HTML page and contact sheet; fake_api: a stand-in webui API for the
tests and for scale, the client's scaling benchmark (``python -m hidiffusion_lib.batch.scale``).
"""
