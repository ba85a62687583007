"""Every command in README.md's code blocks, and every script's `Run:` line, parses as written: its options
exist and their values are accepted. README.md is read at test time, so that whatever the README says today is
what is checked.

A command is a line (continuation lines joined, `&&` and `;` splitting) whose program is python, python3 or
torchrun, after any VAR=value prefix and a `$ ` prompt. It runs:
  - a script of the kit (`python train_cutmix.py ...`, `torchrun ... train_cutmix.py ...`, toy2d.py,
    patch_analysis.py): a dry parse, as the script parses its command line (common.parse_args: the protocols
    resolved, the limits checked; under torchrun with its process count, on a machine taken to have CUDA,
    where the README's GPU commands run);
  - a tool (`python -m tools NAME ...`, `python common.py NAME ...`): the tool's own argparse parser on its
    part, and the options after `--` of `seeds` and `costs` as the training script's;
  - anything else (pip, pytest, venv): skipped.
Placeholders (an upper-case word such as ROOT, N, H,W or the L of u2pl_L) stand for the reader's values: an
option given one must exist; a tool's text option keeps it (a name is a name), any other such option is left
out of the parse (its default stands in), so that the rest of the command is still checked."""
import argparse
import ast
import dataclasses
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

import common
from conftest import ROOT
from tools.__main__ import COMMANDS

PROGRAMS = {"python", "python3", "torchrun"}
NO_PARSER = {"summary": (0, 1), "sbd-to-aug": (2, 2)}  # tools that read their arguments by count


def readme_commands(text):
    """[(line as written, tokens)] of the commands in the markdown `text`'s fenced code blocks."""
    found = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in re.split(r"&&|;", line):
                try:
                    tokens = shlex.split(part, comments=True)
                except ValueError:  # not shell (an unbalanced quote in a printout)
                    continue
                tokens = tokens[1:] if tokens[:1] == ["$"] else tokens
                while tokens and re.fullmatch(r"[A-Za-z_]\w*=\S*", tokens[0]):  # OMP_NUM_THREADS=1 ...
                    tokens = tokens[1:]
                if tokens and Path(tokens[0]).name in PROGRAMS:
                    found.append((part.strip(), tokens))
    return found


def is_placeholder(value):
    """An upper-case word for the reader's value, alone or in a path: ROOT, N, H,W, u2pl_L/labeled.txt."""
    pieces = re.split(r"[/,_.\-:=]+", value.removesuffix("..."))  # RUN... : one or more runs
    return any(re.fullmatch(r"[A-Z][A-Z0-9]*", piece) for piece in pieces)


def without_placeholders(argv, known, keep=()):
    """argv less the options whose value is a placeholder (but those in `keep`), each of which must be a
    `known` option."""
    kept, i = [], 0
    while i < len(argv):
        joined = argv[i].startswith("--") and "=" in argv[i]  # --flag=value
        flag, value = argv[i].split("=", 1) if joined else (argv[i], None)
        step = 1 if value is not None else 2
        value = value if value is not None else argv[i + 1] if i + 1 < len(argv) else ""
        if flag.startswith("--") and is_placeholder(value) and flag not in keep:
            assert flag in known, f"{flag} is no option"
            i += step
        else:
            kept.append(argv[i])
            i += 1
    return kept


def parse_script(script, argv, world, monkeypatch):
    """A kit script's dry parse: its own parse_args (toy2d.py, patch_analysis.py) or common.parse_args."""
    path = ROOT / script
    assert path.is_file() and path.parent == ROOT, f"{script}: no such script in the kit"
    module = importlib.import_module(path.stem)
    known = {"-h", "--help"} | {"--" + f.name.replace("_", "-") for f in dataclasses.fields(module.Args)
                                if f.metadata.get("cli")}
    argv = without_placeholders(argv, known)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in dict(WORLD_SIZE=world, LOCAL_WORLD_SIZE=world, RANK=0, LOCAL_RANK=0).items():
            mp.setenv(name, str(value))
        mp.setattr(torch.cuda, "is_available", lambda: True)  # the README's GPU commands; nothing runs on it
        try:
            if hasattr(module, "parse_args"):  # toy2d.py, patch_analysis.py
                return module.parse_args(argv)
            return common.parse_args(module.Args, argv)
        except SystemExit as done:  # --help
            assert done.code == 0, f"argparse refused {argv}"


class Captured(Exception):
    """Raised by a tool's first parse_args call: it carries the tool's parser."""


def tool_parser(name, argv):
    """(the argparse parser that `python -m tools NAME` builds, whether it passes the options it does not know on
    to a training script's parser: parse_known_args), caught as the tool starts parsing."""
    with pytest.MonkeyPatch.context() as mp:
        def capture(parser, *args, **kwargs):
            raise Captured(parser, False)

        def capture_known(parser, *args, **kwargs):
            raise Captured(parser, True)
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        mp.setattr(argparse.ArgumentParser, "parse_known_args", capture_known)
        with pytest.raises(Captured) as caught:
            COMMANDS[name](name, argv)
    return caught.value.args


def parse_tool(argv, monkeypatch):
    assert argv and argv[0] in COMMANDS, f"no tool {argv[:1]}"
    name, argv = argv[0], argv[1:]
    if name in NO_PARSER:
        low, high = NO_PARSER[name]
        assert low <= len(argv) <= high and not any(a.startswith("-") for a in argv), argv
        return
    cut = argv.index("--") if "--" in argv and name in ("seeds", "costs") else len(argv)
    own, rest = argv[:cut], argv[cut + 1:]
    parser, passes_on = tool_parser(name, own)
    if passes_on:  # evaluate, loader: their own options, the rest a training script's (parsed as TrainArgs)
        known = {flag for action in parser._actions for flag in action.option_strings}
        known |= {"--" + f.name.replace("_", "-") for f in dataclasses.fields(common.TrainArgs)}
        opts, rest = parser.parse_known_args(without_placeholders(own, known, keep=known))
        common.command_line(common.TrainArgs, without_placeholders(rest, known))
        return
    known = {flag for action in parser._actions for flag in action.option_strings}
    text = {flag for action in parser._actions if action.type in (None, str) for flag in action.option_strings}
    try:
        opts = parser.parse_args(without_placeholders(own, known, keep=text))
    except SystemExit as done:
        assert done.code == 0, f"argparse refused {own}"
        return
    if name == "seeds":  # the script's options: as that script parses them, with a seed of the tool's
        parse_script(opts.script, rest + ["--seed", "1"], 1, monkeypatch)
    elif name == "costs":  # each cell: train_<method>.py --dataset D --benchmark N OPTIONS
        for dataset in opts.datasets:
            for method in opts.methods:
                cell = ["--dataset", dataset, "--benchmark", str(opts.iters), *rest]
                parse_script(f"train_{method}.py", cell, opts.nproc, monkeypatch)


def check(tokens, monkeypatch):
    """Dry-parse one command's tokens (program first); False when it runs nothing of the kit."""
    program, argv = Path(tokens[0]).name, tokens[1:]
    if program == "torchrun":
        script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        launcher = " ".join(argv[:script])
        nproc = re.search(r"--nproc[_-]per[_-]node[= ](\d+)", launcher)
        parse_script(argv[script], argv[script + 1:], int(nproc.group(1)) if nproc else 1, monkeypatch)
        return True
    if argv[:2] == ["-m", "tools"]:
        parse_tool(argv[2:], monkeypatch)
        return True
    if argv[:1] == ["common.py"]:  # the shortcut of python -m tools
        parse_tool(argv[1:], monkeypatch)
        return True
    if argv and argv[0].endswith(".py"):
        parse_script(argv[0], argv[1:], 1, monkeypatch)
        return True
    return False  # python -m pip, -m pytest, -m venv, ...


def test_the_readme_commands_are_found():
    """A training script, a torchrun launch and a tool are found (guards the reader of commands above)."""
    commands = [tokens for _, tokens in readme_commands((ROOT / "README.md").read_text())]
    assert any(len(t) > 1 and re.fullmatch(r"train_\w+\.py", t[1]) for t in commands)
    assert any(Path(t[0]).name == "torchrun" for t in commands)
    assert any(t[1:3] == ["-m", "tools"] for t in commands)


USER_DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # the README and the pages it links


@pytest.mark.parametrize("line, tokens", [found for doc in USER_DOCUMENTS for found in
                                          readme_commands(doc.read_text())],
                         ids=lambda value: value if isinstance(value, str) else "")
def test_every_readme_command_parses(line, tokens, monkeypatch):
    monkeypatch.chdir(ROOT)
    try:
        check(tokens, monkeypatch)
    except common.UserError as refusal:
        pytest.fail(f"README: `{line}` is refused: {refusal}")
    except AssertionError as problem:
        pytest.fail(f"README: `{line}`: {problem}")


def test_the_reader_of_commands_on_a_made_up_readme(monkeypatch):
    """The parts above on known lines: what counts as a command, placeholders, the refusals it reports."""
    text = ("text `python train_cutmix.py --bogus` outside a block\n```bash\n"
            "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && "
            ".venv/bin/python train_cutmix.py\n"
            "OMP_NUM_THREADS=1 python train_cutmix.py --dataset pascal_aug --data-root ROOT \\\n"
            "    --n-labeled N   # a comment\n$ python -m tools predict RUN_DIR x.jpg --out OUT --tile H,W\n"
            "```\n```\nbenchmark: train_cutmix.py | demo\n```\n")
    found = readme_commands(text)
    assert [tokens[:2] for _, tokens in found] == [["python3", "-m"], [".venv/bin/python", "train_cutmix.py"],
                                                   ["python", "train_cutmix.py"], ["python", "-m"]]
    assert found[2][1] == ["python", "train_cutmix.py", "--dataset", "pascal_aug", "--data-root", "ROOT",
                           "--n-labeled", "N"]
    values = ("ROOT", "N", "H,W", "u2pl_L/labeled.txt", "RUN...", "runs/mine", "513", "resnet101.pth", "cuda")
    assert [is_placeholder(v) for v in values] == [True] * 5 + [False] * 4
    assert [check(tokens, monkeypatch) for _, tokens in found] == [False, True, True, True]  # venv: skipped
    refused = {"torchrun --nproc_per_node 4 train_cutmix.py --dataset pascal_aug": "--batch-size 10",
               "python train_cutmix.py --n-labeled abc": "argparse refused",
               "python train_cutmix.py --bogus ROOT": "--bogus is no option",
               "python -m tools predict RUN --out O --bogus 1": "argparse refused",
               "python -m tools seeds train_cutmix.py -- --iters 0": "--iters must be at least 1",
               "python -m tools costs --datasets demo -- --lr -1": "--lr must be a positive number",
               "python -m tools summary a b": "['a', 'b']"}
    for line, words in refused.items():
        with pytest.raises((common.UserError, AssertionError, SystemExit), match=re.escape(words)):
            check(shlex.split(line), monkeypatch)


def run_lines():
    """The commands of every script's docstring (`Run:` and the lines under it), less the prose after them."""
    found = []
    for path in sorted(ROOT.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for line in doc.splitlines():
            command = re.match(r"\s*(?:Run:)?\s*(python \S+\.py\b.*)", line)
            if command:
                found.append(re.split(r"\s{2,}", command.group(1))[0])
    return found


def test_every_scripts_run_line_parses(monkeypatch):
    """`Run:   python train_cutmix.py --dataset cityscapes --n-labeled 372` and the like, as written."""
    lines = run_lines()
    assert {shlex.split(line)[1] for line in lines} >= {p.name for p in ROOT.glob("train_*.py")}
    monkeypatch.chdir(ROOT)
    for line in lines:
        assert check(shlex.split(line), monkeypatch), line


@pytest.mark.parametrize("script", sorted(p.name for p in ROOT.glob("*.py") if p.name != "common.py"))
def test_help_describes_the_script_in_whole_sentences(script, monkeypatch, capsys):
    """--help's description is the docstring's first paragraph, whole (not its first line, cut mid-sentence)."""
    module = importlib.import_module(Path(script).stem)
    monkeypatch.setitem(sys.modules, "__main__", module)
    with pytest.raises(SystemExit) as done:
        common.command_line(module.Args, ["--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    first = " ".join(module.__doc__.split("\n\n")[0].split())
    assert first in shown and first.endswith((".", ")")), first
