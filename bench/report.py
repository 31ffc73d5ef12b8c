"""The benchmark results as Markdown tables (to paste into the README)."""

from __future__ import annotations

from typing import Any

LABELS = {"relay": "relay (sessions on, the default)", "relay_nosessions": "relay (sessions off)",
          "bare": "bare CLI (same argv/env)"}
RATIO_LABELS = {"relay": "ratio relay / bare", "relay_nosessions": "ratio relay (sessions off) / bare"}


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str(c) for c in head]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    fmt = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    fmt.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return fmt


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    out = [f"### Benchmark ({env['date']}, {env['cpus']} CPUs, Claude Code CLI {env['cli_version']}, "
           f"mock Anthropic API)", ""]
    lat = res.get("latency")
    if lat:
        out += [f"**Time to first token and total time** ({lat['runs']} sequential runs each, interleaved, "
                f"prompt with `{lat['prompt_marker']}`; relay: streaming chat completion over HTTP):", ""]
        rows = []
        names = [n for n in LABELS if n in lat]
        for name in names:
            t, tot = lat[name]["ttft"], lat[name]["total"]
            rows.append([LABELS[name], _ms(t["p50_ms"]), _ms(t["p95_ms"]), _ms(tot["p50_ms"]), _ms(tot["p95_ms"])])
        b = lat["bare"]
        for name in names:
            if name == "bare":
                continue
            r = lat[name]
            rows.append([RATIO_LABELS[name],
                         _ratio(r["ttft"]["p50_ms"], b["ttft"]["p50_ms"]),
                         _ratio(r["ttft"]["p95_ms"], b["ttft"]["p95_ms"]),
                         _ratio(r["total"]["p50_ms"], b["total"]["p50_ms"]),
                         _ratio(r["total"]["p95_ms"], b["total"]["p95_ms"])])
        out += _table(["Path", "TTFT p50", "TTFT p95", "Total p50", "Total p95"], rows)
        out += ["", f"Relay overhead (p50 relay TTFT - p50 bare TTFT): **{lat['overhead_ms']:.0f} ms**"
                + (f" (sessions off: {lat['overhead_nosessions_ms']:.0f} ms)"
                   if lat.get("overhead_nosessions_ms") is not None else "")
                + ". Run-to-run noise of the CLI start-up is larger than that."]
        inner = (lat.get("relay") or {}).get("outside_cli")
        if inner:
            out += ["", "Time the relay adds outside the CLI, per request (client TTFT minus the relay's recorded "
                    "CLI-spawn-to-first-token; HTTP, parsing, Redis lock/slot, temp files, SSE): "
                    f"p50 **{inner['p50_ms']:.1f} ms**, p95 {inner['p95_ms']:.1f} ms."]
        out.append("")
    mem = res.get("memory")
    if mem:
        out += [f"**Memory** (1 gevent worker, {mem['in_flight_at_sample']} streams held open past their first token; "
                "RSS of the worker process only, the CLIs are separate processes):", ""]
        out += _table(["Worker RSS idle", f"Worker RSS, {mem['in_flight_at_sample']} streams", "Per in-flight stream",
                       "Worker RSS after close", "CLI process RSS (avg)"],
                      [[f"{mem['worker_rss_idle_mb']:.1f} MB", f"{mem['worker_rss_loaded_mb']:.1f} MB",
                        f"{mem['worker_mb_per_stream']:.2f} MB", f"{mem['worker_rss_after_close_mb']:.1f} MB",
                        f"{mem['cli_rss_avg_mb']} MB x {mem['cli_processes']}"]])
        if mem["worker_rss_after_close_mb"] - mem["worker_rss_loaded_mb"] > 20:
            out += ["", "The jump after close is one-time: the hung-up streams are cancelled, have no usage from "
                    "the CLI, and their token estimate loads tiktoken's cl100k table (~40 MB) lazily."]
        out.append("")
    rps = res.get("models_rps")
    if rps:
        out += [f"**Throughput of GET /v1/models** (2 gevent workers; {rps['threads']} client threads with "
                f"keep-alive for {rps['duration_s']} s, client on the same machine):", ""]
        out += _table(["Requests", "Requests/s", "Latency p50", "Latency p95", "Worker CPU", "Client CPU"],
                      [[rps["requests"], f"{rps['rps']:.0f}", f"{rps['p50_ms']:.1f} ms", f"{rps['p95_ms']:.1f} ms",
                        f"{rps['server_cpu_cores']:.2f} cores", f"{rps['client_cpu_cores']:.2f} cores"]])
        out.append("")
    conv = res.get("conversation")
    if conv:
        out += [f"**Conversations: resume vs. full-history replay** (user messages of "
                f"{conv['user_message_chars']} chars, answers of 40 words; resume: X-Session-Id with sessions on, "
                f"median of {conv['conversations']} conversations; replay: sessions off, median of "
                f"{conv['replay_repeats']} requests; TTFT seen by the client, relay TTFT = CLI spawn to first "
                "token as the relay records it):", ""]
        rows = []
        for n in conv["checkpoints"]:
            modes = conv["at_turn"][str(n)]
            for mode in ("resume", "replay"):
                m = modes.get(mode) or {}
                if not m:
                    continue
                rows.append([n, mode, _ms(m["ttft_p50_ms"]), _ms(m["relay_ttft_p50_ms"]), _ms(m["total_p50_ms"]),
                             f"{m['bytes_to_cli']:,}", "yes" if m["resumed"] else "no"])
        out += _table(["Turn N", "Mode", "TTFT", "Relay TTFT", "Total", "Bytes to CLI", "Resumed"], rows)
        out.append("")
    return "\n".join(out)


def footer(res: dict[str, Any]) -> str:
    env = res["environment"]
    return (f"Bench wall time: {res['wall_time_s']:.0f} s; 1-minute load average {env['loadavg_1m_at_start']} "
            f"at the start, {env['loadavg_1m_at_end']} at the end.")
