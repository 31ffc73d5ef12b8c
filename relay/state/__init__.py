"""State shared by every worker and host, kept in Redis: leases, conversations, keys, quotas, stats,
stored responses, the response cache, account state. The only place Redis key names are spelled.
Imports only `core`."""
