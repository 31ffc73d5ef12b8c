"""The account chooser, the reading of the CLI's rate-limit events, the accounts config and alert bodies (pure)."""

from __future__ import annotations

import json

import pytest

from relay.config import ConfigError, load_settings
from relay.core.alerts import body
from relay.core.routing import AccountView, blocked_summary, choose, headroom, limit_reset, uses_overage, windows_of

NOW = 1_800_000_000.0


def view(name: str, util: float | None = None, priority: int = 1, convs: int = 0, runs: int = 0,
         **state: object) -> AccountView:
    st: dict[str, object] = dict(state)
    if util is not None:
        st.update(five_hour_util=util, five_hour_reset=NOW + 3600)
    return AccountView(name, priority, 0, st, runs, convs)


def names(views: list[AccountView]) -> list[str]:
    return [v.name for v in views]


def test_the_account_with_more_headroom_comes_first():
    assert names(choose([view("a", 0.9), view("b", 0.2)], now=NOW)) == ["b", "a"]


def test_equal_headroom_spreads_by_conversations_then_runs():
    vs = [view("a", 0.31, convs=3), view("b", 0.35, convs=1), view("c", 0.33, convs=1, runs=2)]
    assert names(choose(vs, now=NOW)) == ["b", "c", "a"]


def test_a_lower_priority_is_used_only_when_the_higher_cannot_answer():
    vs = [view("spare", 0.0, priority=2), view("main", 0.85, priority=1)]
    assert names(choose(vs, now=NOW))[0] == "main"
    vs[1].state["cooldown_until"] = NOW + 60
    assert names(choose(vs, now=NOW)) == ["spare"]


def test_a_conversation_keeps_its_account_while_usable_and_tried_accounts_are_skipped():
    vs = [view("a", 0.1), view("b", 0.7)]
    assert names(choose(vs, sticky="b", now=NOW))[0] == "b"
    assert names(choose(vs, sticky="b", exclude=["b"], now=NOW)) == ["a"]


def test_a_window_whose_reset_passed_counts_as_empty():
    assert headroom({"five_hour_util": 1.0, "five_hour_reset": NOW - 1}, NOW) == 1.0
    assert headroom({"five_hour_util": 0.4, "seven_day_util": 0.7, "seven_day_reset": NOW + 9}, NOW) == \
        pytest.approx(0.3)


def test_no_usable_account_names_each_and_the_earliest_reset():
    vs = [view("a", cooldown_until=NOW + 900, cooldown_kind="limit", cooldown_reason="5-hour limit"),
          view("b", cooldown_until=NOW + 300, cooldown_kind="overage", cooldown_reason="extra usage"),
          view("c", login_problem="401", login_until=NOW + 60)]
    text, earliest, only_login = blocked_summary(vs, NOW)
    assert earliest == NOW + 300 and not only_login
    assert "a: usage limit reached" in text and "b: would draw on extra usage" in text and "c: login" in text
    assert blocked_summary(vs[2:], NOW)[2] is True


def test_rate_limit_events_as_the_pinned_cli_writes_them():
    allowed = {"status": "allowed", "resetsAt": NOW + 100, "rateLimitType": "five_hour", "isUsingOverage": False,
               "overageStatus": "rejected", "unifiedWindows": {
                   "five_hour": {"utilization": 0.3, "resetsAt": NOW + 100, "status": "allowed"},
                   "seven_day": {"utilization": 0.1, "resetsAt": NOW + 9000, "status": "allowed"}}}
    assert windows_of(allowed) == {"five_hour": {"utilization": 0.3, "resets_at": NOW + 100, "status": "allowed"},
                                   "seven_day": {"utilization": 0.1, "resets_at": NOW + 9000, "status": "allowed"}}
    assert not uses_overage(allowed)
    overage = {"status": "rejected", "resetsAt": NOW + 100, "overageStatus": "allowed", "isUsingOverage": True,
               "overageInUse": True}
    assert uses_overage(overage) and limit_reset(overage, NOW) == NOW + 100
    old_cli = {"status": "rejected", "resetsAt": NOW + 50, "rateLimitType": "seven_day"}
    assert windows_of(old_cli) == {"seven_day": {"utilization": 1.0, "resets_at": NOW + 50, "status": "rejected"}}


def test_alert_bodies_in_each_format():
    item = {"id": "x", "event": "account_limited", "account": "a", "text": "a is limited", "host": "h",
            "time": "t", "details": {}}
    assert body("json", item) == item
    # Slack without mrkdwn and Telegram without link previews: a quoted text cannot format itself (issue 20)
    assert body("slack", item) == {"text": "[claude-relay] a is limited", "mrkdwn": False}
    assert body("telegram", item, 42) == {"chat_id": 42, "text": "[claude-relay] a is limited",
                                          "link_preview_options": {"is_disabled": True}}


@pytest.mark.parametrize("accounts, problem", [
    ([{"name": "a"}], "needs config_dir or oauth_token_env"),
    ([{"name": "a", "config_dir": "/x"}, {"name": "a", "config_dir": "/y"}], "used twice"),
    ([{"name": "a b", "config_dir": "/x"}], "needs a name"),
    ([{"name": "a", "config_dir": "/x", "max_concurrent": -1}], "max_concurrent"),
    ([{"name": "a", "config_dir": "/x", "priority": 0}], "priority"),
    ([{"name": "a", "oauth_token_env": "not a var"}], "environment variable"),
    ([{"name": "a", "config_dir": "/x", "token": "sk"}], "unknown field"),
    ([{"name": "a", "config_dir": "/x", "reserve": 0}], "reserve must be a fraction"),
    ([{"name": "a", "config_dir": "/x", "reserve": 1.5}], "reserve must be a fraction"),
    ([{"name": "a", "config_dir": "/x", "reserve": "90%"}], "reserve must be a fraction"),
    ([{"name": "a", "config_dir": "/x", "reserve": True}], "reserve must be a fraction"),
])
def test_a_wrong_accounts_entry_is_refused_at_start_naming_it(tmp_path, accounts, problem):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"accounts": accounts}))
    with pytest.raises(ConfigError) as e:
        load_settings(cfg, env={})
    assert "accounts" in str(e.value) and problem in str(e.value)


def test_the_documented_accounts_shape_and_alert_settings_load(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({
        "accounts": [{"name": "team-a", "config_dir": "/srv/claude/a", "oauth_token_env": "CLAUDE_TOKEN_A",
                      "max_concurrent": 2, "priority": 1, "reserve": 0.9}],
        "accounts_overage": "allow",
        "alerts": {"webhooks": [{"url": "https://hooks.example.com/x", "format": "slack"},
                                {"url": "https://api.telegram.org/botX/sendMessage", "format": "telegram",
                                 "chat_id": 5}], "thresholds": [0.5, 0.9]}}))
    s = load_settings(cfg, env={})
    assert s["accounts"][0]["name"] == "team-a" and s["accounts_overage"] == "allow"
    from relay.core.routing import AccountSpec
    assert AccountSpec.from_config(s["accounts"][0]).reserve == 0.9
    assert s["alerts.thresholds"] == [0.5, 0.9]
    cfg.write_text(json.dumps({"alerts": {"webhooks": [{"url": "https://x", "format": "telegram"}]}}))
    with pytest.raises(ConfigError, match="chat_id"):
        load_settings(cfg, env={})


# -- every window, staleness, reserve, the per-model bucket, burn-rate headroom (issue 21) -----------------
def test_windows_of_reads_every_window_with_status_and_surpassed_threshold():
    from relay.core.routing import windows_of
    info = {"status": "allowed_warning", "resetsAt": NOW + 100, "rateLimitType": "five_hour", "unifiedWindows": {
        "five_hour": {"utilization": 0.42, "resetsAt": NOW + 100, "status": "allowed_warning",
                      "surpassedThreshold": 0.4},
        "seven_day": {"utilization": 0.13, "resetsAt": NOW + 9000, "status": "allowed"},
        "seven_day_overage_included": {"utilization": 1, "resetsAt": NOW + 8000, "status": "rejected"},
        "something_new": {"utilization": 0.5}}}
    assert windows_of(info) == {
        "five_hour": {"utilization": 0.42, "resets_at": NOW + 100, "status": "allowed_warning", "surpassed": 0.4},
        "seven_day": {"utilization": 0.13, "resets_at": NOW + 9000, "status": "allowed"},
        "seven_day_overage_included": {"utilization": 1.0, "resets_at": NOW + 8000, "status": "rejected"}}
    assert windows_of({"unifiedWindows": {"five_hour": {"utilization": 0.1, "status": "bogus"}}}) == \
        {"five_hour": {"utilization": 0.1}}


def test_a_stale_window_is_unknown_not_empty():
    from relay.core.routing import window
    st = {"five_hour_util": "0.7", "five_hour_reset": str(NOW - 5), "five_hour_status": "allowed_warning",
          "seven_day_util": "0.2", "seven_day_reset": str(NOW + 50)}
    assert window(st, "five_hour", NOW) == {"utilization": None, "resets_at": NOW - 5, "status": None,
                                            "surpassed_threshold": None, "stale": True}
    assert window(st, "seven_day", NOW)["utilization"] == 0.2 and not window(st, "seven_day", NOW)["stale"]
    assert window(st, "seven_day_overage_included", NOW) is None


def test_model_family_from_ids_and_aliases():
    from relay.core.routing import model_family
    assert [model_family(m) for m in ("claude-opus-5-5", "opus", "Claude-Sonnet-4", "haiku", "gpt-4o", None)] == \
        ["opus", "opus", "sonnet", "haiku", "", ""]


def test_a_reserve_stops_new_conversations_but_not_the_account_s_own():
    a = view("a", 0.9)
    a.reserve = 0.9
    b = view("b", 0.95)          # no reserve: used, however full
    assert names(choose([a, b], now=NOW)) == ["b"]
    assert names(choose([a, b], sticky="a", now=NOW)) == ["a", "b"]
    a.state["five_hour_util"] = 0.89
    assert names(choose([a, b], now=NOW))[0] == "a"
    a.state.update(five_hour_util=0.95, five_hour_reset=NOW - 1)   # stale: its reserve is not known to be reached
    assert "a" in names(choose([a], now=NOW))
    a.state["five_hour_reset"] = NOW + 60
    text, earliest, _ = blocked_summary([a], NOW)
    assert "a: at its reserve" in text and "five_hour at 95%" in text and earliest == NOW + 60
    # the per-model bucket's reserve holds only for the families it counts (opus)
    c = view("c", seven_day_overage_included_util=0.95, seven_day_overage_included_reset=NOW + 86400)
    c.reserve = 0.9
    assert names(choose([c], now=NOW, family="sonnet")) == ["c"] and not choose([c], now=NOW, family="opus")


def test_a_per_model_bucket_refusal_takes_the_account_out_for_that_family_only():
    from relay.core.routing import family_key, model_rejection, usability
    refused = {"status": "rejected", "resetsAt": NOW + 700, "rateLimitType": "seven_day_overage_included",
               "unifiedWindows": {"five_hour": {"utilization": 0.4, "resetsAt": NOW + 60, "status": "allowed"},
                                  "seven_day_overage_included": {"utilization": 1, "resetsAt": NOW + 700,
                                                                 "status": "rejected"}}}
    assert model_rejection(refused) == NOW + 700
    no_kind = dict(refused, rateLimitType=None)     # what the notes describe: only the bucket rejected
    assert model_rejection(no_kind) == NOW + 700
    both = dict(no_kind, unifiedWindows=dict(refused["unifiedWindows"],
                                             five_hour={"utilization": 1, "status": "rejected"}))
    assert model_rejection(both) is None            # the account's own window: the whole account is out
    allowed = dict(refused, status="allowed", rateLimitType="five_hour")  # a sonnet turn reports the bucket too
    assert model_rejection(allowed) is None
    st = {family_key("opus"): str(NOW + 700)}
    assert not usability(st, NOW, "opus").usable and usability(st, NOW, "opus").kind == "model_limit"
    assert usability(st, NOW, "sonnet").usable and usability(st, NOW).usable and usability(st, NOW + 701, "opus").usable
    v = view("a", **st)
    assert names(choose([v], now=NOW, family="sonnet")) == ["a"] and not choose([v], now=NOW, family="opus")
    assert "usage limit reached for opus models" in blocked_summary([v], NOW, "opus")[0]
    from relay.core.routing import no_account_error
    err = no_account_error([v], True, now=NOW, family="opus")
    assert err.status == 429 and "for opus models (other models may still be served)" in err.message
    assert err.retry_after == pytest.approx(700)


def test_headroom_is_a_burn_rate_weighed_by_how_soon_each_window_resets():
    from relay.core.routing import burn_headroom
    five = 5 * 3600
    # 60 % used with a tenth of the window left: what is left would be lost at the reset -> preferred
    soon = view("soon", five_hour_util=0.6, five_hour_reset=NOW + five * 0.1)
    fresh = view("fresh", five_hour_util=0.3, five_hour_reset=NOW + five * 0.95)   # 30 % used in 5 % of its time
    assert burn_headroom(soon.state, NOW) == pytest.approx(4.0)
    assert burn_headroom(fresh.state, NOW) == pytest.approx(0.7 / 0.95)
    assert names(choose([fresh, soon], now=NOW)) == ["soon", "fresh"]
    # the tightest window counts: a weekly window filled early outweighs an empty 5-hour one
    weekly = view("weekly", five_hour_util=0.0, five_hour_reset=NOW + five, seven_day_util=0.5,
                  seven_day_reset=NOW + 7 * 86400 * 0.9)
    assert burn_headroom(weekly.state, NOW) == pytest.approx(0.5 / 0.9)
    assert names(choose([weekly, fresh], now=NOW)) == ["fresh", "weekly"]
    assert burn_headroom({}, NOW) == 1.0
    # priority and stickiness still come first
    assert names(choose([fresh, soon], sticky="fresh", now=NOW))[0] == "fresh"
    fresh.priority, soon.priority = 1, 2
    assert names(choose([fresh, soon], now=NOW))[0] == "fresh"


def test_threshold_alerts_are_claimed_once_per_window_period():
    from relay.state.account_alerts import AccountAlerts
    sent: list[tuple[str, int]] = []
    seen: set[str] = set()

    def emit(event, account, text, alert_id, ttl=0, details=None):
        if alert_id in seen:
            return False
        seen.add(alert_id)
        sent.append((alert_id, ttl))
        return True
    alerts = AccountAlerts(emit, [0.8])
    info = {"unifiedWindows": {"five_hour": {"utilization": 0.85, "resetsAt": NOW + 7200, "status": "allowed_warning",
                                             "surpassedThreshold": 0.75},
                               "seven_day_overage_included": {"utilization": 0.81, "resetsAt": NOW + 86400}}}
    alerts.thresholds_crossed("a", info, NOW)
    alerts.thresholds_crossed("a", info, NOW + 10)
    period = int((NOW + 7200) // 3600)
    assert sorted(i for i, _ in sent) == sorted([f"threshold:a:five_hour:0.75:{period}",
                                                 f"threshold:a:five_hour:0.8:{period}",
                                                 f"threshold:a:seven_day_overage_included:0.8:"
                                                 f"{int((NOW + 86400) // 3600)}"])
    # the next period of the window is news again; a reset beyond the window's length names no period
    nxt = {"unifiedWindows": {"five_hour": {"utilization": 0.9, "resetsAt": NOW + 7200 + 5 * 3600}}}
    alerts.thresholds_crossed("a", nxt, NOW + 7300)
    forged = {"unifiedWindows": {"five_hour": {"utilization": 0.9, "resetsAt": NOW + 10 * 86400}}}
    alerts.thresholds_crossed("a", forged, NOW)
    alerts.thresholds_crossed("a", dict(forged, unifiedWindows={"five_hour": {"utilization": 0.9,
                                                                             "resetsAt": NOW + 20 * 86400}}), NOW)
    assert [i for i, _ in sent[3:]] == [f"threshold:a:five_hour:0.8:{period + 5}", "threshold:a:five_hour:0.8:?"]
