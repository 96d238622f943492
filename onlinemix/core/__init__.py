"""What every stage relies on: the config and its registry of names, the errors a user can act on, file
writing that survives crashes, the training schedule shared by trainers and producers, device placement,
collectives, and the command-line support every command shares.

Builds on: nothing else in the package.
"""
