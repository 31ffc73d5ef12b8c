"""The pure core: translation between the client APIs and what the CLI reads and prints.

Nothing here does I/O: no Flask, Redis, subprocess, sockets or files (tests/test_layers.py checks
the imports). Everything here can be tested with plain values.
"""
