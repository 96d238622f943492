"""bench/aim.py's parts: the settings and one run of each (``runs``), means and Student t intervals over seeds
(``stats``), and the table and plot (``report``)."""
