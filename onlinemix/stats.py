"""``python -m onlinemix.stats``: the command of :mod:`onlinemix.tools.stats`."""

from onlinemix.tools.stats import main

if __name__ == "__main__":
    main()
