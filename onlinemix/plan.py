"""``python -m onlinemix.plan``: the command of :mod:`onlinemix.tools.plan`."""

from onlinemix.tools.plan import main

if __name__ == "__main__":
    main()
