"""Bad-data accounting of the shard streams (docs/architecture.md, Data): counts, warnings, the stopping rule.

A sample whose image does not decode (PNG), holds the wrong number of bytes (raw: the message names
the member, the size found and the size expected) or has the wrong size or label is skipped with a
:class:`CorruptDataWarning`; a shard that cannot be opened, or ends early (truncated), counts every
sample it did not deliver as bad. :class:`Health` keeps the counts in shared memory (per rank: the
DataLoader workers add to them) from the start of the stream; a delivered sample counts when it is
decoded, one at a time (not per batch, which would count a batch's bad samples before its good ones),
a shard's missing range all at once, and the message says how many were read in all.

Stopping rule: while streaming, a :class:`BadDataError` stops the run as soon as the one-sided 99 %
Wilson score lower bound of bad / read exceeds ``max_bad_fraction`` (checked at every bad sample,
after at least ``_MIN_BAD`` of them), so a 25 %-bad set stops within a few dozen samples and a
0.5 %-bad set (below the default 1 %) practically never does; at the end of a full pass the plain
fraction decides. The message gives the counts and the last problem.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import warnings

_MAX_WARNINGS = 10  # per process and stream; then one note that further ones are counted silently
_Z = 2.326  # one-sided 99 % standard normal quantile, for the Wilson lower bound
# Bad samples before the streaming bound may stop a run: the bound is re-checked at every bad sample,
# and without a floor one bad sample among the first 13 read would already "prove" more than 1 %
# (a stream with 0.5 % bad samples would then stop in about 7 % of runs; with 5, in about 0.1 %).
_MIN_BAD = 5


class CorruptDataWarning(UserWarning):
    """A sample or shard was skipped."""


class BadDataError(RuntimeError):
    """Too large a fraction of the data is unreadable."""


def wilson_lower(bad: int, n: int, z: float = _Z) -> float:
    """One-sided Wilson score lower bound of the bad fraction after ``bad`` of ``n`` (0 when ``n`` is 0)."""
    if n <= 0:
        return 0.0
    p, z2 = bad / n, z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n))


class Health:
    """Counts of good and bad samples since the start of a stream, shared by a rank's workers.

    A sample counts when it is decoded (good or bad, one at a time, not per batch), or when a shard
    does not deliver it (bad, a shard's whole missing range at once). ``read`` is their sum. Raises
    :class:`BadDataError` when the data is worse than ``max_bad_fraction`` (module docstring).
    """

    def __init__(self, name: str, max_bad_fraction: float):
        self.name = name  # "train" / "eval": used in messages
        self.max_bad_fraction = max_bad_fraction  # fail when more of the data is bad
        self.counts = mp.Array("q", 3)  # [good, bad, missing], in shared memory (inherited by workers)
        self.last = ""  # the latest problem seen in this process
        self._warned = 0

    @property
    def good(self) -> int:
        return int(self.counts[0])

    @property
    def bad(self) -> int:
        """Samples that did not decode or check, plus those shards did not deliver."""
        return int(self.counts[1])

    @property
    def missing(self) -> int:
        """Samples that unopenable or truncated shards did not deliver (part of ``bad``)."""
        return int(self.counts[2])

    @property
    def read(self) -> int:
        """Samples read so far: good plus bad."""
        return self.good + self.bad

    def add_good(self, n: int = 1) -> None:
        with self.counts.get_lock():
            self.counts[0] += n

    def add_bad(self, n: int, message: str) -> None:
        """Samples that did not decode or check."""
        with self.counts.get_lock():
            self.counts[1] += n
        self._report(n, message)

    def add_missing(self, n: int, message: str) -> None:
        """Samples a shard should hold but did not deliver (bad, counted all at once)."""
        with self.counts.get_lock():
            self.counts[1] += n
            self.counts[2] += n
        self._report(n, message)

    def _report(self, n: int, message: str) -> None:
        self.last = message
        self._warned += 1
        if self._warned <= _MAX_WARNINGS:
            note = " (further ones are counted without a warning)" if self._warned == _MAX_WARNINGS else ""
            warnings.warn(f"data: skipped {n} {self.name} sample(s): {message}{note}", CorruptDataWarning, 3)
        self.check(final=False)

    def check(self, final: bool) -> None:
        """Raise BadDataError when too much is bad: with ``final`` (after a full pass) by the plain
        fraction, else by the 99 % lower bound, once at least ``_MIN_BAD`` samples are bad."""
        with self.counts.get_lock():
            good, bad, missing = (int(v) for v in self.counts)
        read, limit = good + bad, self.max_bad_fraction
        if bad == 0 or bad <= limit * read:
            return
        if final:
            verdict = f", more than data.max_bad_fraction={limit}"
        else:
            low = wilson_lower(bad, read)
            if bad < _MIN_BAD or low <= limit:
                return
            verdict = f"; at 99 % confidence at least {100 * low:.1f} % of the data is bad, more than "
            verdict += f"data.max_bad_fraction={limit}"
        gone = f" ({missing} of them missing from shards that do not open or end early)" if missing else ""
        raise BadDataError(
            f"data: {bad} of {read} {self.name} samples read so far ({100 * bad / read:.1f} %) are "
            f"unreadable{gone}{verdict}" + (f"; last problem: {self.last}" if self.last else "")
        )
