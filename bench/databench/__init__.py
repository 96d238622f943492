"""bench/data.py's parts: the memory of processes sharing a store (``memory``) and the report (``report``)."""
