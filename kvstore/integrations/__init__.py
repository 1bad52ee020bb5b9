"""Integrations of kvstore with model frameworks.

Each submodule needs its framework as an optional extra and is imported explicitly, e.g.
``from kvstore.integrations.hf import PagedGeneration`` (``pip install 'kvstore-llm[hf]'``; the distribution
is ``kvstore-llm``). ``hf`` is one request per cache, ``hf_batch`` batches several caches in one forward
(continuous batching), ``models`` builds seeded Llama-shaped test models ("tiny", "1b", "8b").
"""
