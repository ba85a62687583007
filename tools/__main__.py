"""`python -m tools COMMAND ...`: the commands of tools/__init__.py."""
import sys

import common
from tools import compare, costs, evaluate, loader, paper, predict, sbd

COMMANDS = {"predict": predict.main, "evaluate": evaluate.main, "seeds": paper.main, "summary": paper.main,
            "compare": compare.main, "costs": costs.main, "loader": loader.main, "sbd-to-aug": sbd.main}

if __name__ == "__main__":
    common.files.start_command()  # bad input: one line, no traceback; names that are not UTF-8 as their bytes
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(sys.modules["tools"].__doc__)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[1], sys.argv[2:]))
