"""`gptlaunch VERB ARGS...`, the installed command (`pip install -e .`): each verb is the `python -m` form it stands
for, run as that module would be, with the rest of the command line as its own."""
from __future__ import annotations

import runpy
import sys

VERBS = {  # verb -> (module, arguments put first)
    "run": ("launch", ()), "sweep": ("launch", ("-m",)), "status": ("launch.status", ()),
    "logs": ("launch.logs", ()), "cancel": ("launch.cancel", ()), "list": ("launch.list", ()),
    "report": ("launch.report", ()), "export": ("gpt.export", ()), "evaluate": ("gpt.evaluate", ()),
    "generate": ("gpt.generate", ()), "memory-snapshot": ("launch.memory_snapshot", ()),
    "step-trace": ("launch.step_trace", ()),
}


def usage() -> str:
    width = max(map(len, VERBS))
    rows = [f"  {verb:<{width}}  python -m {module}{''.join(' ' + a for a in first)} ..."
            for verb, (module, first) in VERBS.items()]
    return "usage: gptlaunch VERB [ARGS...]; each verb is the command it stands for:\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if args else 2)
    if args[0] not in VERBS:
        print(f"error: gptlaunch {args[0]!r} is not a verb: one of {', '.join(VERBS)}", file=sys.stderr)
        sys.exit(2)
    module, first = VERBS[args[0]]
    sys.argv = [f"gptlaunch {args[0]}", *first, *args[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
