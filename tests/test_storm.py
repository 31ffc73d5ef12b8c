"""Storm control after a failover: conversations moving off a limited account ramp onto the next one
(relay/core/storm.py), instead of the whole herd landing on it at once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from harness import openai_client
from test_accounts import ask, start, tokens

from relay.core.storm import ramp_cap

pytestmark = pytest.mark.slow


def test_the_ramp():
    assert [ramp_cap(t, 20, 2, 6) for t in (0, 4.9, 5, 10, 15, 19.9, 20, 99)] == [2, 2, 3, 4, 5, 5, 6, 6]
    assert ramp_cap(3, 0, 2, 6) == 6 and ramp_cap(3, 20, 8, 6) == 6 and ramp_cap(-1, 20, 2, 6) == 2


@pytest.mark.parametrize("ramp", ["120", "0"])
def test_a_herd_moving_to_another_account_ramps_onto_it(relay_factory, mock_api, ramp):
    ta, tb = tokens(2)
    mock_api.set_account(ta, five_hour=0.1)
    mock_api.set_account(tb, five_hour=0.6)               # new conversations all go to a0 (more headroom)
    srv = start(relay_factory, [ta, tb], env={"RELAY_ACCOUNTS_FAILOVER_RAMP_S": ramp,
                                              "RELAY_ACCOUNTS_FAILOVER_START": "2", "RELAY_MAX_CONCURRENT_RUNS": "8"})
    c = openai_client(srv.url)
    convs = [f"st{ramp}-{i}" for i in range(7)]
    histories: dict[str, list] = {s: [] for s in convs}
    for s in convs:
        ask(c, f"{s} first", session=s, history=histories[s])
    # a1's windows are unknown until its first answer (full headroom): one conversation may start there
    herd = [s for s in convs if mock_api.by_token(ta, f"{s} first")]
    assert len(herd) >= 6
    sent_b = len(mock_api.by_token(tb))
    mock_api.set_account(ta, five_hour=1.0, five_hour_reset=int(time.time()) + 900)   # a0 goes down
    mock_api.max_active_by_token[tb] = 0
    with ThreadPoolExecutor(len(herd)) as pool:
        outs = list(pool.map(lambda s: ask(c, f"{s} again MOCK:delay=2", session=s, history=histories[s]), herd))
    assert outs == [f"Hello from mock. You said: {s} again MOCK:delay=2" for s in herd]
    assert len(mock_api.by_token(tb)) == sent_b + len(herd)   # every conversation moved, with its full history
    for s in herd:
        assert f"{s} first" in str(mock_api.by_token(tb, f"{s} again")[0]["body"]["messages"])
    if ramp == "0":
        assert mock_api.max_active_by_token[tb] >= 3       # without the ramp the herd lands at once
    else:
        assert mock_api.max_active_by_token[tb] <= 2       # the ramp's start: 2 at once


def test_a_request_whose_estimated_share_would_cross_the_reserve_goes_elsewhere(relay_factory, mock_api):
    """With the block policy, an account that this request's estimated share (its learnt utilization per
    token times the request's tokens) would take past its reserve is not chosen (core/share_estimate.py)."""
    ta, tb = tokens(2)
    mock_api.set_account(ta, five_hour=0.50, seven_day=0.1, per_request=0.05)
    mock_api.set_account(tb, five_hour=0.85, seven_day=0.1)
    srv = start(relay_factory, [ta, tb], [{"reserve": 0.9}, {}])
    c = openai_client(srv.url)

    def served(text, session):
        r = requests.post(srv.url + "/v1/chat/completions", timeout=60, headers={"X-Session-Id": session},
                          json={"model": "sonnet", "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 200, r.text
        return r.headers["x-relay-account"]

    assert served("se-p1 hi", "se-p1") == "a0"           # both unknown: a0 by name; then a1 learns its 0.85
    assert served("se-p2 hi", "se-p2") == "a1"
    for i in range(3):                                   # a0 learns: 0.05 per 5,005-token turn
        assert served(f"se-learn{i} MOCK:usage=5000,0,0,5", "se-learn") == "a0"
    assert served("se-small hi", "se-small") == "a0"     # a0 at about 0.65 has more room than a1 at 0.85
    big = "se-big " + "lorem ipsum dolor " * 8000        # about 24,000 tokens: about 0.24 of a0's window
    assert served(big, "se-big") == "a1"                 # about 0.7 + 0.24 would pass a0's reserve of 0.9
    acct = {a["name"]: a for a in requests.get(srv.url + "/v1/accounts", timeout=10).json()["data"]}["a0"]
    assert acct["usable"] and acct["windows"]["five_hour"]["utilization"] == pytest.approx(0.70)
    del c
