"""``python -m onlinemix <command>``: commands about the installation itself (training is ``onlinemix.train``)."""

import sys

COMMANDS = {"env": "print the versions, devices and backend choices a bug report needs"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:6} {what}" for name, what in COMMANDS.items())
        print(f"usage: python -m onlinemix <command>\n\ncommands:\n{listing}\n\n"
              "training, evaluation and the cache: python -m onlinemix.train | onlinemix.eval | onlinemix.cache --help",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from onlinemix.tools.env import main as env_main

    return env_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
