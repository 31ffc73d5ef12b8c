"""The receipt of one answer: which account served it, where that account's windows stand, whether it drew
on overage, this key's share of each window, and the model that actually answered when it is not the one
asked for. Pure: the figures come from the account's meter (state/accounts.py) and the key's shares
(state/shares.py); this module only reads, compares and renders them.

A window is any `<window>_util` field of the account's meter (`five_hour`, `seven_day`, and whichever
others the CLI reports, such as `seven_day_overage_included`), with its `<window>_reset`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .models import FAMILIES

UTIL = "_util"
RESET = "_reset"


@dataclass(frozen=True)
class Window:
    utilization: float
    resets_at: float | None


def windows(state: dict[str, Any]) -> dict[str, Window]:
    """Every window an account's meter holds (its Redis hash), by name; unreadable figures are left out."""
    out: dict[str, Window] = {}
    for name, value in state.items():
        name = name.decode() if isinstance(name, bytes) else str(name)
        if not name.endswith(UTIL) or len(name) <= len(UTIL):
            continue
        util = _number(value)
        if util is None:
            continue
        window = name[: -len(UTIL)]
        out[window] = Window(util, _number(state.get(window + RESET)))
    return dict(sorted(out.items()))


def _number(value: Any) -> float | None:
    if isinstance(value, bytes):
        value = value.decode()
    try:
        n = float(value)
    except (TypeError, ValueError):
        return None
    return n if math.isfinite(n) and n >= 0 else None


def turn_delta(before: Window | None, after: Window) -> float | None:
    """The rise of one window across a turn, clamped at 0: `after` minus the utilization read at admission.
    A window that reset in between started again from 0; None when there is no figure from before it
    (the account's first report: the turn's own share cannot be told)."""
    if before is None:
        return None
    if before.resets_at is not None and after.resets_at is not None and before.resets_at != after.resets_at:
        return max(0.0, after.utilization)
    return max(0.0, after.utilization - before.utilization)


def served_differs(requested: str, served: str | None) -> bool:
    """Whether the model that answered is not the one asked for (a fallback, a downgrade). `requested` is the
    CLI's `--model` (core/models.py resolved the client's name): a family alias ("sonnet") is answered by any
    model of that family, a short id ("claude-sonnet-4-5") by its dated ids; anything else must match."""
    if not served or served == "<synthetic>":
        return False
    want, got = requested.removesuffix("[1m]").lower(), served.removesuffix("[1m]").lower()
    if not want or want == got or got.startswith(want + "-"):
        return False
    if want in FAMILIES:
        return want not in got.split("-")
    return True


def _fmt(n: float) -> str:
    return f"{round(n, 6):g}"


def pairs(values: dict[str, float]) -> str:
    """`five_hour=0.47, seven_day=0.18`: one header's list of window figures."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())


@dataclass
class Receipt:
    account: str = ""
    when: str = "after_turn"                         # after_turn | before_turn (a stream's head)
    utilization: dict[str, float] = field(default_factory=dict)
    resets_at: dict[str, int] = field(default_factory=dict)
    overage_in_use: bool | None = None
    key_share: dict[str, float] = field(default_factory=dict)    # this key's share of each window, on this account
    window_share: float | None = None                # the key's cap (api_keys[].window_share), if any
    requested_model: str = ""
    served_model: str | None = None                   # set only when it differs from the one asked for

    def headers(self) -> dict[str, str]:
        """The response headers: present only for what is known (an account without windows has none)."""
        out: dict[str, str] = {}
        if self.account:
            out["x-relay-account"] = self.account
        if self.utilization:
            out["x-relay-receipt"] = self.when
            out["x-relay-window-utilization"] = pairs(self.utilization)
        if self.resets_at:
            out["x-relay-window-reset"] = ", ".join(f"{k}={v}" for k, v in self.resets_at.items())
        if self.overage_in_use is not None:
            out["x-relay-overage-in-use"] = "true" if self.overage_in_use else "false"
        if self.utilization:
            out["x-relay-key-window-share"] = pairs({w: self.key_share.get(w, 0.0) for w in self.utilization})
        if self.window_share is not None:
            out["x-relay-key-window-share-limit"] = _fmt(self.window_share)
        if self.served_model:
            out["x-relay-served-model"] = self.served_model
            out["x-relay-requested-model"] = self.requested_model
        return out

    def record(self) -> dict[str, Any]:
        """What the request record keeps (`/v1/usage/recent`, the stats)."""
        return {"account": self.account, "when": self.when,
                "utilization": {k: round(v, 6) for k, v in self.utilization.items()},
                "resets_at": dict(self.resets_at), "overage_in_use": self.overage_in_use,
                "key_share": {k: round(v, 6) for k, v in self.key_share.items()},
                "window_share": self.window_share, "served_model": self.served_model}


def receipt_of(account: str, state: dict[str, Any], key_share: dict[str, float], window_share: float | None,
               requested: str, served: str | None, when: str = "after_turn", asked: str = "") -> Receipt:
    """The receipt from an account's meter (`state`, its Redis hash) and this key's shares; `requested` is
    the CLI model the request ran with, `asked` the client's own name for it (the header shows that)."""
    wins = windows(state)
    overage = state.get("overage_in_use")
    if isinstance(overage, bytes):
        overage = overage.decode()
    return Receipt(account=account, when=when, utilization={k: w.utilization for k, w in wins.items()},
                   resets_at={k: int(w.resets_at) for k, w in wins.items() if w.resets_at is not None},
                   overage_in_use=None if overage in (None, "") else overage == "1",
                   key_share=key_share, window_share=window_share, requested_model=asked or requested,
                   served_model=served if served_differs(requested, served) else None)
