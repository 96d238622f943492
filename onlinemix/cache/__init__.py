"""Persistent on-disk cache of generated synthetic images: storage (``store``) and the ``cache`` command."""

from .store import (CacheError, CacheReader, Served, ShardWriter, Variation, cache_key, cache_keys, check_writable,
                    evict_to_limit, generator_description, select_key, writer_for)

__all__ = ["CacheError", "CacheReader", "Served", "ShardWriter", "Variation", "cache_key", "cache_keys",
           "check_writable", "evict_to_limit", "generator_description", "select_key", "writer_for"]
