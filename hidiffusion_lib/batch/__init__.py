"""Batch HiDiffusion sweeps against a running webui (``--api``): ``python -m hidiffusion_lib.batch``.

jobfile: the job file's schema and grid expansion; client: the webui API; manifest: the output
directory's record; runner: run and resume; report: HTML page and contact sheet.
"""
