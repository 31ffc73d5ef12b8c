"""The host's warm CLI pool: `protocol` (the socket's messages), `policy` (which runs it serves),
`source` (what a worker asks), `client`, `server` (one per host) and `processes` (what it holds).

Imports nothing itself: gunicorn's master reads `protocol`, and `server` must patch gevent first."""
