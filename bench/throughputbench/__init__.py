"""bench/throughput.py's parts: pairs through the ring in one process (``ring``), the node split modelled from
the measured rates (``split``), and the report (``report``)."""
