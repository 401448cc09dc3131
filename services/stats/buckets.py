"""Time buckets of the Redis aggregates: a 1 s tier and a 60 s tier, by event time.

Keys (P = the key prefix, m = v|c|p for views, carts, purchases):
  P:f:<second>:<m>      sorted set, member product id, score = events in that second
  P:fu:<second>:<pid>   HyperLogLog of the user ids seen for that product in that second
  P:m:<minute>:<m>      sorted set per minute (minute = unix seconds // 60)
  P:mu:<minute>:<pid>   HyperLogLog per minute

A window of W seconds ending with the current second c is answered from
- W <= fine_window_s: the W one-second buckets c-W+1 .. c (exact to the second);
- longer: the 1 s buckets of the current minute plus the k whole minutes before it,
  k chosen so the span is as close to W as possible (|span - W| <= 30 s).
Each response states the span it counted ("from", "to").

Every key expires at an absolute time derived from its bucket (EXPIREAT), so a late
write never extends a bucket's life; an event too old for any window is stored in
Postgres only.
"""

from __future__ import annotations

from dataclasses import dataclass

HORIZON_S = 3600  # the longest window the API answers
SLACK_S = 5  # clock skew between processes and time spent in the writer


@dataclass(frozen=True)
class Cover:
    """The buckets that answer one window query (inclusive ranges; empty when from > to)."""

    fine_from: int
    fine_to: int
    coarse_from: int
    coarse_to: int

    @property
    def start_s(self) -> int:
        """First second counted."""
        return self.coarse_from * 60 if self.coarse_from <= self.coarse_to else self.fine_from

    @property
    def end_s(self) -> int:
        """First second not counted."""
        return self.fine_to + 1

    def as_args(self) -> list[int]:
        return [self.fine_from, self.fine_to, self.coarse_from, self.coarse_to]


@dataclass(frozen=True)
class Tiers:
    fine_window_s: int

    @property
    def fine_keep_s(self) -> int:
        """How long after its second a 1 s bucket can still be part of an answer (+ slack)."""
        return max(self.fine_window_s, 60) + SLACK_S

    @property
    def coarse_keep_s(self) -> int:
        """How long after its minute ends a 60 s bucket can still be part of an answer."""
        return HORIZON_S + 60 + SLACK_S

    def fine_bucket(self, ts_us: int, now_s: int) -> int | None:
        """The 1 s bucket of an event, or None when no window can reach it any more."""
        second = ts_us // 1_000_000
        return second if second + self.fine_keep_s > now_s else None

    def coarse_bucket(self, ts_us: int, now_s: int) -> int | None:
        """The 60 s bucket of an event, or None when no window can reach it any more."""
        minute = ts_us // 60_000_000
        return minute if (minute + 1) * 60 + self.coarse_keep_s > now_s else None

    def cover(self, window_s: int, now_s: int) -> Cover:
        """The buckets counted for a window of `window_s` seconds ending with second `now_s`."""
        if window_s <= self.fine_window_s:
            return Cover(now_s - window_s + 1, now_s, 1, 0)
        minute_start = now_s - now_s % 60
        recent = now_s - minute_start + 1  # seconds of the current minute, 1..60
        whole_minutes = (window_s - recent + 30) // 60
        current_minute = minute_start // 60
        return Cover(minute_start, now_s, current_minute - whole_minutes, current_minute - 1)
