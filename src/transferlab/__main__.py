"""`transferlab <tool> key=value ...` (also `python -m transferlab <tool> ...`): runs
`python -m transferlab.tools.<tool> key=value ...` in this process's place, so that Lightning's DDP
children and SLURM re-run the tool itself."""

from __future__ import annotations

import os
import pkgutil
import sys

import transferlab.tools


def tool_names() -> list[str]:
    """The modules of transferlab.tools that are tools (not the shared `app`)."""
    return sorted(m.name for m in pkgutil.iter_modules(transferlab.tools.__path__) if m.name != "app")


def main() -> None:
    names = tool_names()
    usage = f"usage: transferlab <tool> [key=value ...]   tools: {', '.join(names)}   (<tool> --help: its options)"
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(usage)
        raise SystemExit(0 if len(sys.argv) >= 2 else 2)
    tool = sys.argv[1]
    if tool not in names:
        print(f"Error: no tool {tool!r}. {usage}", file=sys.stderr)
        raise SystemExit(2)
    command = [sys.executable, "-m", f"transferlab.tools.{tool}", *sys.argv[2:]]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
