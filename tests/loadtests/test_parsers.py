"""wrk and ab output parsers, against output captured from real runs.

tests/loadtests/data/ holds what wrk 4.1.0 and ab 2.3 printed when run against
the calibration hello app (granian), a python http.server answering 404, a
socket that closes half its connections without a reply, and a closed port.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.parsers import (
    ParseError,
    parse_ab,
    parse_ab_gnuplot,
    parse_ab_with_gnuplot,
    parse_wrk,
    parse_wrk_text,
)

DATA = Path(__file__).parent / "data"


def read(name: str) -> str:
    return (DATA / name).read_text()


def test_wrk_keepalive_with_latency_distribution() -> None:
    m = parse_wrk_text(read("wrk_keepalive_latency.txt"))
    assert m.requests == 35252
    assert m.duration_s == pytest.approx(2.01)
    assert m.rps == pytest.approx(17574.49)
    assert m.latency_ms["avg"] == pytest.approx(1.57)
    assert m.latency_ms["max"] == pytest.approx(29.49)
    assert m.latency_ms["p50"] == pytest.approx(0.769)
    assert m.latency_ms["p90"] == pytest.approx(1.92)
    assert m.latency_ms["p99"] == pytest.approx(19.67)
    assert m.kb_per_s == pytest.approx(2.31 * 1024)
    assert m.extra["bytes"] == pytest.approx(4.64 * 1024**2)
    assert m.socket_errors == {}
    assert m.statuses == {"2xx/3xx": 35252}


def test_wrk_without_latency_flag_has_no_percentiles() -> None:
    m = parse_wrk_text(read("wrk_close_nolatency.txt"))
    assert m.requests == 18316
    assert m.latency_ms["avg"] == pytest.approx(0.86)
    assert "p99" not in m.latency_ms
    assert m.kb_per_s == pytest.approx(1.37 * 1024)


def test_wrk_non_2xx_counts_as_errors_when_classified() -> None:
    m = parse_wrk_text(read("wrk_non2xx_errors.txt")).classify([200])
    assert m.statuses == {"non-2xx/3xx": 4151, "2xx/3xx": 0}
    assert m.errors == 4151
    assert m.error_rate == pytest.approx(1.0)
    assert m.kb_per_s == pytest.approx(0.98 * 1024)


def test_wrk_socket_errors() -> None:
    m = parse_wrk_text(read("wrk_socket_errors.txt")).classify([200])
    assert m.socket_errors == {"connect": 0, "read": 7844, "write": 0, "timeout": 0}
    assert m.statuses["non-2xx/3xx"] == 7843
    assert m.errors == 7844 + 7843
    assert m.latency_ms["p99"] == pytest.approx(8.24)
    assert m.kb_per_s == pytest.approx(278.39)


def test_wrk_that_could_not_connect_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        parse_wrk_text(read("wrk_refused.txt"))


def test_wrk_script_json_summary_wins_over_text() -> None:
    """scripts/common.lua's LOADTEST_JSON line: p99.9, statuses, per-second counts, marks."""
    m = parse_wrk(read("wrk_script_json.txt"), keepalive=True).classify([200])
    assert m.requests == 54659
    assert m.duration_s == pytest.approx(2.000651)
    assert m.rps == pytest.approx(54659 / 2.000651)
    assert m.latency_ms["p50"] == pytest.approx(0.5)
    assert m.latency_ms["p99"] == pytest.approx(1.925)
    assert m.latency_ms["p99.9"] == pytest.approx(5.535)
    assert m.latency_ms["avg"] == pytest.approx(0.60192657)
    assert m.statuses == {"200": 54659}
    assert m.errors == 0
    assert m.timeline == [[0.0, 291.0], [1.0, 26359.0], [2.0, 28009.0]]
    assert m.conn_reuse_rate is None  # keep-alive: wrk does not count connections
    # product.lua draws ids from a Zipf-like law: id 1 is by far the most requested.
    ids = {int(k[2:]): v for k, v in m.marks.items()}
    # marks count requests sent; up to one per connection was in flight when wrk stopped
    assert 54659 <= sum(ids.values()) <= 54659 + 16
    assert ids[1] > ids[2] > ids[5] > ids[10]
    assert ids[1] / sum(ids.values()) == pytest.approx(0.37, abs=0.03)


def test_ab_keepalive_reuse_rate_and_totals() -> None:
    m = parse_ab(read("ab_keepalive.txt")).classify([200])
    assert m.requests == 54487
    assert m.rps == pytest.approx(27243.20)
    assert m.duration_s == pytest.approx(2.0)
    assert m.conn_reuse_rate == pytest.approx(1.0)
    assert m.kb_per_s == pytest.approx(4309.96)
    assert m.latency_ms["avg"] == pytest.approx(0.587)
    assert m.latency_ms["p99"] == 1.0
    assert m.latency_ms["max"] == 5.0
    assert m.connect_ms == 0.0
    assert m.errors == 0


def test_ab_short_connections_with_gnuplot_file() -> None:
    m = parse_ab_with_gnuplot(read("ab_close.txt"), DATA / "ab_close.gnuplot.tsv")
    assert m.requests == 3000
    assert m.conn_reuse_rate == 0.0
    assert m.rps == pytest.approx(10325.99)
    starts, totals, connects = parse_ab_gnuplot(DATA / "ab_close.gnuplot.tsv")
    assert len(starts) == len(totals) == len(connects) == 3000
    assert m.latency_ms["max"] == max(totals) == 2.0
    assert m.connect_ms == pytest.approx(sum(connects) / 3000)
    assert sum(count for _, count in m.timeline) == 3000
    assert m.extra["resolution_ms"] == 1.0


def test_ab_non_2xx() -> None:
    m = parse_ab(read("ab_non2xx.txt")).classify([200])
    assert m.statuses == {"non-2xx": 300, "2xx": 0}
    assert m.errors == 300
    assert m.kb_per_s == pytest.approx(892.15)


def test_ab_refused_connections_are_socket_errors_not_replies() -> None:
    m = parse_ab(read("ab_refused.txt")).classify([200])
    assert m.requests == 0  # ab calls them "complete"; none got a reply
    assert m.socket_errors == {"connect": 0, "receive": 50, "exceptions": 25}
    assert m.error_rate == pytest.approx(1.0)


def test_ab_length_mismatches_are_not_errors() -> None:
    """Callback replies differ in length ("processed"/"duplicate"): ab -l, and never errors."""
    text = read("ab_close.txt").replace(
        "Failed requests:        0\n",
        "Failed requests:        7\n   (Connect: 0, Receive: 0, Length: 7, Exceptions: 0)\n",
    )
    m = parse_ab(text).classify([200])
    assert m.extra["length_mismatches"] == 7
    assert m.errors == 0


def test_garbage_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        parse_ab("ab: invalid option -- 'Z'")
