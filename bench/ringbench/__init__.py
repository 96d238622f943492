"""bench/ring.py's parts: the pairs and their checks (``pairs``), the processes that move them through the ring
(``ring_workers``) and through a Queue (``queue_workers``), one configuration's run (``runs``), and the report
(``report``)."""
