"""The shared remote tier (Redis / Valkey, standalone or cluster): copies of committed pages.

- :mod:`.url` — URL forms and credential redaction.
- :mod:`.keys` — remote keys (namespace + layout + chained page key; no token ids).
- :mod:`.codec` — value header (magic, version, layout, scope, page key, length, xxh3-64) and checks.
- :mod:`.breaker` — the circuit breaker.
- :mod:`.client` — deadline-bounded pipelined commands on separate read and write pools.
- :mod:`.gather` — reading held pages' bytes out of the local tiers, off the loop.
- :mod:`.writer` — the bounded write-through queue and its background writer.
- :mod:`.fetch` — ``lookup_remote`` and ``fetch_prefix``.
- :mod:`.engine` — one manager's remote tier, joining them.
"""
