"""What a user runs now and then, beside training: the simulator of the online system, the planner that
sizes a node's split of generating and training GPUs from it, variation statistics, and the environment report.

Builds on: core, data, cache, exchange, generation, views, training.
"""
