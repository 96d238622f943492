"""Where producers hand pairs to trainers: the shared-memory ring (:mod:`~onlinemix.exchange.ring`, the only
module that reads or writes its slot table), the trainers' aim scores and noise levels that tell producers which
images to generate for and how different (:mod:`~onlinemix.exchange.aim`) and a trainer batch's pair lookup
(:mod:`~onlinemix.exchange.lookup`: ring first, then the staleness policy: the disk cache, waiting, or a real
second view). The simulator
(:mod:`onlinemix.tools.simulate`) drives the same lookup step on a virtual clock.

Builds on: core, cache.
"""
