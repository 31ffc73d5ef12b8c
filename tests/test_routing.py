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
                      "max_concurrent": 2, "priority": 1}],
        "accounts_overage": "allow",
        "alerts": {"webhooks": [{"url": "https://hooks.example.com/x", "format": "slack"},
                                {"url": "https://api.telegram.org/botX/sendMessage", "format": "telegram",
                                 "chat_id": 5}], "thresholds": [0.5, 0.9]}}))
    s = load_settings(cfg, env={})
    assert s["accounts"][0]["name"] == "team-a" and s["accounts_overage"] == "allow"
    assert s["alerts.thresholds"] == [0.5, 0.9]
    cfg.write_text(json.dumps({"alerts": {"webhooks": [{"url": "https://x", "format": "telegram"}]}}))
    with pytest.raises(ConfigError, match="chat_id"):
        load_settings(cfg, env={})
