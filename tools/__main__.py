"""`python -m tools COMMAND ...`: the commands of tools/__init__.py."""
import sys

import common
from tools import costs, evaluate, paper, predict, sbd

COMMANDS = {"predict": predict.main, "evaluate": evaluate.main, "seeds": paper.main, "summary": paper.main,
            "costs": costs.main, "sbd-to-aug": sbd.main}

if __name__ == "__main__":
    sys.excepthook = common.excepthook  # bad input: one line, no traceback
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(sys.modules["tools"].__doc__)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[1], sys.argv[2:]))
