"""Errors a user can act on. Each stage raises its own class (a bad config, a missing dataset, a damaged cache
shard, a dead producer...), all derived from :class:`UserError`, whose message says what is wrong and what to do.
The commands print such an error as one line, without a traceback, and exit; anything else is a bug and keeps
its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, described well enough to act on."""
