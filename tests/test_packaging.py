"""What ships: a non-editable install carries every subpackage, and the gunicorn master imports only the config
(and the pool's wire format and the helpers' supervisor, standard library only)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from harness import ROOT


def test_a_wheel_ships_every_subpackage_and_the_mcp_server(tmp_path: Path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("claude_max_relay-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "relay").rglob("*.py")}
    assert expected <= names, sorted(expected - names)
    assert "relay/cli/mcp_server.py" in names
    static = {str(p.relative_to(ROOT)) for p in (ROOT / "relay" / "api" / "static").iterdir()}
    assert static and static <= names, sorted(static - names)  # the dashboard's and usage page's files


def test_the_gunicorn_master_imports_only_the_config_the_pool_protocol_and_the_supervisor():
    code = ("import runpy, sys; runpy.run_path('gunicorn.conf.py'); "
            "print(sorted(m for m in sys.modules if m == 'relay' or m.startswith('relay.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "RELAY_CONFIG": str(ROOT / "config.json")})
    # the sweep of dead runs' folders, the pool's wire format (its socket path and its module name) and the
    # supervisor of the private Redis and the pool server: standard library only as well
    assert out.stdout.strip() == ("['relay', 'relay.cli', 'relay.cli.leftovers', 'relay.cli.pool', "
                                  "'relay.cli.pool.protocol', 'relay.config', 'relay.supervise']")
    for heavy in ("flask", "redis", "gevent"):
        assert heavy not in out.stdout
