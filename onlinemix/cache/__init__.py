"""The persistent on-disk cache of every generated variation: shards and their keys (``store``), verification
and eviction (``maintenance``), format migration, export and import, and the ``python -m onlinemix.cache``
command.

Builds on: core.
"""

from onlinemix.cache.store import (
    CacheError,
    CacheReader,
    Served,
    ShardWriter,
    Variation,
    cache_key,
    cache_keys,
    check_writable,
    evict_to_limit,
    generator_description,
    recorded_noise,
    select_key,
    writer_for,
)

__all__ = ["CacheError", "CacheReader", "Served", "ShardWriter", "Variation", "cache_key", "cache_keys",
           "check_writable", "evict_to_limit", "generator_description", "recorded_noise", "select_key",
           "writer_for"]
