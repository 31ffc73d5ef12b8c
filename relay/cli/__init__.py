"""The Claude Code CLI as a subprocess: its command line, the process and its hygiene, one run's
timeouts and events, agent working folders, the MCP server for client functions. Imports only `core`."""
