"""Transfer: the asynchronous data-movement half of kvstore.

- :mod:`.arenas` — device arena, host arena (pinned, allocated in chunks) and pinned staging buffers.
- :mod:`.diskfile` — the preallocated, 4 KiB-aligned slot file of the disk tier.
- :mod:`.io_backends` — disk I/O behind one interface: kvikio or a POSIX ``preadv``/``pwritev`` pool.
- :mod:`.copier` — batched row copies between memory arenas (CUDA streams + events, or CPU threads).
- :mod:`.executor` — runs a placement :class:`~kvstore.placement.Plan` as a pipeline of batches.
"""
