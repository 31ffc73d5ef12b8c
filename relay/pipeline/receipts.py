"""Receipts and window shares in the pipeline.

Admission: a key with `window_share` skips each account where it already used that share of a window (the
window's reset frees it); on every account it is a 429 `window_share_exceeded` naming the window, with
Retry-After to the earliest time one of them frees the key. An account that reports no windows (API key
mode, or no turn seen yet) has no shares to exceed: no limit applies there. In the last `window_share_release_s` before a
window's reset, its shares no longer cap anyone.

Once the account is chosen its meter is read (the figures before the turn). When the turn ends (and the
meter learned its `rate_limit_event`, pipeline/runner.classify_turn) the rise of each window is attributed
to the key (state/shares.py) and the receipt made: what the response headers, a stream's last comment and
the request record carry. A served model that differs from the one asked for raises `model_mismatch`.
"""

from __future__ import annotations

import logging
import time

from ..core.receipt import Receipt, receipt_of, windows
from ..errors import WindowShareExceeded
from ..state.shares import account_id, live
from .admission import Flight

log = logging.getLogger("relay.pipeline")


def _account_id(f: Flight, name: str) -> str:
    return account_id(f.relay.accounts, name)


def _member(f: Flight) -> str:
    return f.ctx.api_key.id if f.ctx.api_key is not None else "anon"


def _cap(f: Flight) -> float | None:
    return f.ctx.api_key.window_share if f.ctx.api_key is not None else None


def over_share(f: Flight) -> list[str]:
    """The accounts this key may not use now (it used its share of one of their windows); raises
    WindowShareExceeded when that is every account."""
    cap = _cap(f)
    if cap is None:
        return []
    relay, now = f.relay, time.time()
    release_s = f.cfg["window_share_release_s"]  # near its reset, a window's unused shares go to others
    over: dict[str, tuple[float, list[str]]] = {}
    running_resets: dict[str, dict[str, float]] = {}
    for spec in relay.accounts.specs:
        running = {w: win for w, win in live(windows(relay.accounts.state(spec.name)), now).items()
                   if win.resets_at is None or win.resets_at - now > release_s}
        used = relay.shares.used(_account_id(f, spec.name), _member(f), running)
        full = [w for w, share in used.items() if share >= cap]
        running_resets[spec.name] = {w: win.resets_at or now for w, win in running.items()}
        if full:  # free again when the last of its full windows resets
            over[spec.name] = (max(running[w].resets_at or now for w in full), full)
    if over and len(over) == len(relay.accounts.specs):
        name, (free_at, full) = min(over.items(), key=lambda item: item[1][0])
        names = [w.replace("_", "-") for w in full]
        which = f"{names[0]} window" if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]} windows"
        last = "that window" if len(names) == 1 else \
            f"the {max(full, key=lambda w: running_resets[name][w]).replace('_', '-')} window"
        where = f" of account {name}" if len(relay.accounts.specs) > 1 else ""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(free_at))
        raise WindowShareExceeded(
            f"This API key used its share ({cap:g}) of the {which}{where}; it is served again when {last} "
            f"resets at {stamp}.", retry_after=max(1.0, free_at - now))
    return list(over)


def note_before(f: Flight) -> None:
    """The chosen account's windows before the turn (read at admission)."""
    if f.account:
        try:
            f.before = windows(f.relay.accounts.state(f.account))
        except Exception as exc:  # no receipt beats no answer
            log.warning("%s: could not read the account's meter: %s", f.ctx.request_id, exc)
            f.before = {}


def head(f: Flight) -> Receipt:
    """What a stream's head can tell: the account, its windows and the key's shares before the turn, and
    the model that answered (known from message_start, which came before the head)."""
    if not f.account:
        return Receipt()
    state = f.relay.accounts.state(f.account)
    wins = windows(state)
    share = f.relay.shares.used(_account_id(f, f.account), _member(f), wins)
    return receipt_of(f.account, state, share, _cap(f), f.req.cli_model, _served(f), "before_turn", f.req.model)


def take(f: Flight) -> Receipt | None:
    """The receipt of the finished turn, made once: the key is charged the turn's rise of each window."""
    if f.receipt is not None or not (f.run and f.account):
        return f.receipt
    try:
        state = f.relay.accounts.state(f.account)
        after = windows(state)
        seen = f.run.spec.witness if f.run.spec else None  # an agent run: what its proxy saw, not the CLI
        reported = (seen.turn() if seen is not None else f.run.turn).rate_limit
        share = f.relay.shares.add(_account_id(f, f.account), _member(f), f.before, after) \
            if reported else f.relay.shares.used(_account_id(f, f.account), _member(f), after)
        f.receipt = receipt_of(f.account, state, share, _cap(f), f.req.cli_model, _served(f), asked=f.req.model)
    except Exception as exc:  # the answer stands without its receipt
        log.warning("%s: no receipt: %s", f.ctx.request_id, exc)
        return None
    if f.receipt.served_model:
        _mismatch(f, f.receipt)
    return f.receipt


def _served(f: Flight) -> str | None:
    return f.run.turn.model if f.run else None


def _mismatch(f: Flight, r: Receipt) -> None:
    log.warning("%s: asked for %s, answered by %s (account %s)", f.ctx.request_id, r.requested_model,
                r.served_model, f.account)
    f.relay.alerts.emit("model_mismatch", f.account,
                        f"Account {f.account} answered a request for {r.requested_model} (run as "
                        f"{f.req.cli_model}) with {r.served_model}: a fallback or downgrade.",
                        f"model_mismatch:{f.account}:{f.req.cli_model}:{r.served_model}", ttl=3600,
                        details={"requested_model": r.requested_model, "cli_model": f.req.cli_model,
                                 "served_model": r.served_model, "request_id": f.ctx.request_id,
                                 "model_usage": sorted((f.run.turn.result.get("modelUsage") or {}) if f.run else [])})
