"""bench/generate.py's parts: the matrix of rows (``matrix``), the measurements (``measure``, with
``peakmem``), the FLOP count and the device's peak (``flops``, ``peak``), and the report (``report``)."""
