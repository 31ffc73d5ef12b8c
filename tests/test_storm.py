"""Storm control after a failover: conversations moving off a limited account ramp onto the next one
(relay/core/storm.py), instead of the whole herd landing on it at once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
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
