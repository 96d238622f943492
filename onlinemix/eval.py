"""``python -m onlinemix.eval``: the command of :mod:`onlinemix.evaluation.evaluate`."""

from onlinemix.evaluation.evaluate import main

if __name__ == "__main__":
    main()
