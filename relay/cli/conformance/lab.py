"""Where the self-test runs the CLI: the loopback mock API, a throwaway login and folders, and one turn
driven exactly as the relay drives it (`build_spec` → `Run`), with every event kept for the checks."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.events import Delta, Turn
from ...core.prompt import build_prompt
from ...core.run_description import RunDescription, SessionUse
from ...errors import RelayError
from ..invocation import build_spec
from ..process import CliProcess, RunSpec
from ..run import Limits, Run
from ..setup import child_env
from .mock_api import MockApi

# the host's credentials and API settings never reach the self-test's CLI: it must talk to the mock only
DROPPED_ENV = ("CLAUDE_CODE_OAUTH_TOKEN", "CLAUDE_CONFIG_DIR", "CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX",
               "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
TOKEN = "sk-ant-oat01-relay-conformance"   # a placeholder subscription login: the mock accepts anything
MODEL = "sonnet"


class RecordedProcess(CliProcess):
    """A CLI process whose every stdout event is also kept, so a check can see the raw stream."""

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        self.seen: list[dict[str, Any]] = []

    def next_event(self, timeout: float) -> Any:
        ev = super().next_event(timeout)
        if isinstance(ev, dict):
            self.seen.append(ev)
        return ev


@dataclass
class Outcome:
    """One turn as the relay saw it: the fold, the raw events, the exit code, and a crash if any."""
    turn: Turn
    events: list[dict[str, Any]]
    rc: int | None
    stderr: str
    error: RelayError | None = None
    deltas: list[Delta] = field(default_factory=list)   # what the relay would have streamed to a client

    @property
    def types(self) -> list[str]:
        return [str(e.get("type")) for e in self.events]

    def of_type(self, kind: str, subtype: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind and (subtype is None or e.get("subtype") == subtype)]

    def stream(self, kind: str) -> list[dict[str, Any]]:
        """The API's SSE events of this `type` as the CLI wrapped them in `stream_event`s."""
        return [e["event"] for e in self.of_type("stream_event") if (e.get("event") or {}).get("type") == kind]


def env_for(host_env: dict[str, str], mock_url: str, config_dir: str) -> dict[str, str]:
    """The host's CLI environment pointed at the mock with a throwaway subscription login."""
    env = {k: v for k, v in host_env.items() if k not in DROPPED_ENV and not k.startswith("ANTHROPIC_")}
    env = child_env(env, 0, config_dir)
    env.update(ANTHROPIC_BASE_URL=mock_url, CLAUDE_CODE_OAUTH_TOKEN=TOKEN, NO_PROXY="127.0.0.1,localhost",
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    return env


class Lab:
    """The mock API and private folders of one self-test; a context manager that removes them."""

    def __init__(self, claude_bin: str, host_env: dict[str, str], timeout: float = 45.0) -> None:
        self.claude_bin, self.host_env = claude_bin, host_env
        self.root = Path(tempfile.mkdtemp(prefix="relay-conformance-"))
        self.mock = MockApi()
        self.limits = Limits(first_token=timeout, idle=timeout, total=timeout, keepalive=timeout)
        self.timeout = timeout

    def __enter__(self) -> Lab:
        self.mock.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mock.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def bench(self, name: str) -> Bench:
        """A login and folders of its own: CLIs running side by side never share a config directory."""
        return Bench(self, self.root / name)


class Bench:
    """One lane of checks: its own CLI config directory (sessions live there), working folder and temp root."""

    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab, self.mock = lab, lab.mock
        for sub in ("config", "cwd", "tmp"):
            (root / sub).mkdir(parents=True)
        self.cwd, self.tmp = str(root / "cwd"), root / "tmp"
        self.env = env_for(lab.host_env, lab.mock.url, str(root / "config"))

    @staticmethod
    def describe(text: str, session: SessionUse | None = None, system: str = "", **kw: Any) -> RunDescription:
        """A run of one user message, described as the relay describes a request's run."""
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        prompt = build_prompt(system, messages, "replace" if system else "append", True)
        return RunDescription(model=kw.pop("model", MODEL), prompt=prompt, session=session or SessionUse(), **kw)

    def turn(self, desc: RunDescription) -> Outcome:
        """Run `desc` the relay's way: its spec from `build_spec`, driven by `Run` to the end of the turn."""
        spec = build_spec(desc, self.lab.claude_bin, self.env, self.cwd, self.tmp)
        proc = RecordedProcess(spec)
        run = Run(spec, self.lab.limits, proc=proc)
        error: RelayError | None = None
        rc = None
        deltas: list[Delta] = []
        try:
            run.start()
            for ds in run.pump():
                deltas += ds or []
        except RelayError as exc:
            error = exc
        finally:
            if run.turn.done and not run.turn.interrupted_for_tools:
                proc.close_stdin()
                rc = proc.wait_exit(self.lab.timeout / 3)   # the CLI should exit by itself after its result
            run.finish()
        return Outcome(run.turn, proc.seen, rc, proc.stderr_text, error, deltas)

    def spawn(self, argv: list[str]) -> RecordedProcess:
        """A long-lived process as the pool spawns a spare: stdin open, nothing written yet."""
        proc = RecordedProcess(RunSpec(argv=argv, env=self.env, cwd=self.cwd, stdin=b"", keep_stdin_open=True))
        proc.start()
        return proc

    @staticmethod
    def new_session() -> SessionUse:
        return SessionUse(str(uuid.uuid4()))
