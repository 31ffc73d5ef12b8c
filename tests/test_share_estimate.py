"""A request's share of a window, learnt from the account's own turns (relay/core/share_estimate.py)."""

from relay.core.routing import AccountView, blocked_summary, choose
from relay.core.share_estimate import Learnt, learn, learnt_fields, would_cross

START = Learnt(None, 0, None, None)


def test_the_rate_is_learnt_from_moves_of_the_reported_utilization():
    s = learn(START, 0.10, 1000.0, 5_000)            # the first sight of the window: no rate yet
    assert s == Learnt(None, 0, 0.10, 1000.0)
    s = learn(s, 0.10, 1000.0, 40_000)               # rounded: no move yet, the tokens wait
    s = learn(s, 0.11, 1000.0, 10_000)               # 0.01 over 50,000 tokens
    assert abs(s.rate - 2e-7) < 1e-12 and s.pending == 0
    s = learn(s, 0.12, 1000.0, 25_000)               # 0.01 over 25,000: smoothed, not replaced
    assert abs(s.rate - (0.3 * 4e-7 + 0.7 * 2e-7)) < 1e-12
    assert learn(s, 0.13, 1000.0, 10).rate == s.rate  # a move behind too few tokens teaches nothing


def test_a_new_window_starts_over_but_keeps_the_rate():
    s = Learnt(3e-7, 20_000, 0.8, 1000.0)
    assert learn(s, 0.02, 19000.0, 5_000) == Learnt(3e-7, 0, 0.02, 19000.0)
    assert learn(s, 0.5, 1000.0, 5_000).pending == 0  # lower than before: the window started over


def test_would_cross():
    assert would_cross(0.95, None, 10, 0.9)           # already past the line
    assert not would_cross(0.5, None, 10**6, 0.9)     # no rate learnt: only the known utilization counts
    assert would_cross(0.85, 2e-7, 300_000, 0.9) and not would_cross(0.85, 2e-7, 200_000, 0.9)
    assert not would_cross(None, 1.0, 10**6, 0.9)


def test_learnt_fields_follow_the_windows_in_the_account_hash():
    stored = {"five_hour_util": "0.40", "five_hour_reset": "9000", "five_hour_pending": "500"}
    out = learnt_fields(stored, {"five_hour": {"utilization": 0.45, "resets_at": 9000.0}}, 9_500)
    assert out["five_hour_pending"] == 0 and abs(out["five_hour_upt"] - 0.05 / 10_000) < 1e-15
    assert learnt_fields(stored, {"five_hour": {"utilization": 0.40, "resets_at": 9000.0}}, 700) == \
        {"five_hour_pending": 1200}


def test_an_account_whose_window_this_request_would_cross_is_not_chosen():
    now = 1_000.0
    near = {"five_hour_util": 0.80, "five_hour_reset": now + 3600, "five_hour_upt": 1e-6}
    a = AccountView("a", state=dict(near), reserve=0.9)
    b = AccountView("b", state={"five_hour_util": 0.85, "five_hour_reset": now + 3600})   # no rate learnt
    assert [v.name for v in choose([a, b], now=now, estimate=50_000)] == ["a", "b"]     # 0.80 + 0.05 < 0.9
    assert [v.name for v in choose([a, b], now=now, estimate=200_000)] == ["b"]         # 0.80 + 0.2 >= 0.9
    # its own conversation goes on up to the hard limit, not the reserve
    assert [v.name for v in choose([a], sticky="a", now=now, estimate=150_000)] == ["a"]
    assert choose([a], sticky="a", now=now, estimate=250_000) == []
    summary, _, _ = blocked_summary([a], now=now, estimate=200_000)
    assert "too close to its reserve or limit" in summary and "past 90%" in summary
