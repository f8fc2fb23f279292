"""What a benchmark run reports as it goes, and how long it is expected to take.

A run first counts the FLOPs of every forward it will time (on the "meta" device, in no time),
then times one small forward on the real device: the work ahead divided by that speed is the
expected duration, said before the long forwards start. A small forward runs at a lower FLOP
rate than a large one, so the estimate errs long; the progress bar's own estimate follows the
speed actually measured.
"""

from __future__ import annotations


class Progress:
    """The reports of a run; this base ignores them all."""

    def doing(self, what: str) -> None:
        """``what`` starts now."""

    def planned(self, flops: int, seconds: float, forwards: int) -> None:
        """The work ahead: ``forwards`` forwards of ``flops`` FLOPs in all, expected to take
        ``seconds``. Called once per architecture, before its timed forwards."""

    def did(self, flops: int) -> None:
        """A planned forward of ``flops`` FLOPs ended."""

    def measured(self, result: object) -> None:
        """A size is done: ``result`` (a BenchResult) holds every size so far."""


def duration(seconds: float) -> str:
    """3725 -> "1 h 02 min"; 125 -> "2 min 05 s"; 42 -> "42 s"."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def amount(flops: float) -> str:
    """FLOPs for people: "51.3 TFLOP", "820.4 GFLOP"."""
    return f"{flops / 1e12:,.1f} TFLOP" if flops >= 1e11 else f"{flops / 1e9:,.1f} GFLOP"
