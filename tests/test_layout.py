"""Which way the arrows point (common.py's docstring: the scripts and tools/ above it, cutmixseg/ below): the
kit's import graph has no cycle, cutmixseg/ stands on nothing of ours above it, common.py on nothing of tools/;
the files stay readable in size; and the copy test: common.py, cutmixseg/ and one script, copied alone into
another folder, train, resume and draw there."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENV, FAST, ROOT, make_folder_dataset, read_results

SKIP = {"tests", ".git", ".venv", "runs", "__pycache__"}


def kit_files(root=ROOT):
    """Every .py file of the kit but its tests."""
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & SKIP)


def module_name(path, root=ROOT):
    """The name `import` knows a file by: common, cutmixseg.guard, tools (tools/__init__.py), tools.__main__."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree, module, is_package=False):
    """The dotted names a module's source imports, wherever the import stands (module level, inside a function)
    and however it is written: `import a.b`, `from a import b` (a and a.b), `from . import b` (relative to
    `module`), `importlib.import_module("a.b")` with a constant string."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def import_graph(root=ROOT):
    """{module: {kit modules it imports}}: each imported name mapped to the longest kit module it starts with
    (`from cutmixseg import guard` -> cutmixseg.guard; `from common import arg` -> common)."""
    files = {module_name(p, root): p for p in kit_files(root)}

    def kit_module(name):
        parts = name.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in files), None)
    graph = {}
    for module, path in files.items():
        names = imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
        graph[module] = {m for m in map(kit_module, names) if m is not None}
    return graph


def cycles(graph):
    """Every cycle of the graph as a list of modules [a, b, ..., a], found by depth-first search (one per back
    edge; a module importing itself is a cycle too)."""
    found, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_the_import_checker_sees_lazy_relative_and_importlib_imports_and_finds_cycles(tmp_path):
    """The checker itself, on a made-up kit: a lazy import inside a function, a relative import and an
    importlib string are arrows; a cycle through them is found, a chain without one is not."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "low.py").write_text("import json\n\ndef f():\n    import top  # lazy\n    return top\n")
    (tmp_path / "pkg" / "mid.py").write_text("from . import low\nfrom .low import f\n")
    (tmp_path / "top.py").write_text("import importlib\nmid = importlib.import_module('pkg.mid')\n")
    graph = import_graph(tmp_path)
    assert graph == {"pkg": set(), "pkg.low": {"top"}, "pkg.mid": {"pkg", "pkg.low"}, "top": {"pkg.mid"}}
    assert cycles(graph) == [["pkg.low", "top", "pkg.mid", "pkg.low"]]
    (tmp_path / "pkg" / "low.py").write_text("import json\n")
    assert cycles(import_graph(tmp_path)) == []
    assert cycles({"a": {"a"}}) == [["a", "a"]]


def test_the_kits_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"common", "train_cutmix", "cutmixseg.guard", "cutmixseg.nets", "tools.predict", "tools.__main__"} <= set(graph)
    assert "cutmixseg.guard" in graph["common"] and "common" in graph["train_cutmix"]  # the graph sees the arrows
    assert cycles(graph) == []


def test_cutmixseg_imports_neither_common_nor_tools_and_common_nothing_of_tools():
    graph = import_graph()
    below = {m: targets for m, targets in graph.items() if m == "cutmixseg" or m.startswith("cutmixseg.")}
    assert len(below) >= 8
    for module, targets in below.items():
        above = {t for t in targets if t == "common" or t == "tools" or t.startswith("tools.") or t.startswith("train_")}
        assert not above, f"{module} imports {above}: an arrow pointing up"
    assert not {t for t in graph["common"] if t == "tools" or t.startswith("tools.")}
    assert graph["tools.predict"] >= {"common"}  # tools/ stands on common


def test_no_training_script_imports_another():
    graph = import_graph()
    for script in (m for m in graph if m.startswith("train_")):
        assert not {t for t in graph[script] if t.startswith("train_")}, script


def test_common_table_of_contents_names_every_section():
    """The size of the files is a guide in the README's map, not a test (a budget would press code into dense
    lines); what a reader needs is the map: every numbered section of common.py is in its docstring's table."""
    text = (ROOT / "common.py").read_text()
    contents = text.split('"""')[1]
    sections = re.findall(r"^# ---- (\d+)\. ", text, flags=re.M)
    assert sections == [str(n) for n in range(1, len(sections) + 1)] and len(sections) >= 11
    for number in sections:
        assert re.search(rf"^ +{number}\. ", contents, flags=re.M), f"section {number} missing from the contents"
    assert "Catalogues" in contents and "splits/" in contents


READER_FILES = [ROOT / "common.py", *sorted(ROOT.glob("cutmixseg/*.py")), *sorted(ROOT.glob("train_*.py")),
                ROOT / "toy2d.py", ROOT / "patch_analysis.py", *sorted(ROOT.glob("tools/*.py"))]  # read line by line


def test_code_lines_fit_110_characters():
    """Every line of the files a reader reads (code, comments, docstrings) fits in 110 characters: long
    expressions break at natural points, long paragraphs are rewrapped."""
    long = [f"{path.relative_to(ROOT)}:{number} ({len(line)} characters)"
            for path in READER_FILES
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if len(line) > 110]
    assert not long, "lines over 110 characters: " + ", ".join(long)


# ---- the copy test ----------------------------------------------------------------------------------
def copied_kit(folder):
    """common.py, cutmixseg/ and train_cutmix.py alone: no tools/, no tests/."""
    folder.mkdir()
    shutil.copy(ROOT / "common.py", folder)
    shutil.copy(ROOT / "train_cutmix.py", folder)
    shutil.copytree(ROOT / "cutmixseg", folder / "cutmixseg", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def in_copy(kit, *argv):
    """A command run from the copy's folder, with nothing of the original kit on the path."""
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=kit, env=env, capture_output=True, text=True,
                          timeout=600)


def trained_in_copy(proc, out, iters):
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("preview.png", "curves.png", "checkpoint.pt", "results.json", "labeled.txt", "args.json"):
        assert (out / name).is_file(), name
    results = read_results(out)
    assert results["iters"] == iters
    assert proc.stdout.rstrip().splitlines()[-1] == f"FINAL mIoU={results['miou']:.2f}"
    return results


@pytest.mark.slow
def test_a_copy_of_common_cutmixseg_and_one_script_trains_resumes_and_draws(tmp_path):
    kit = copied_kit(tmp_path / "project")
    make_folder_dataset(kit / "data", n_train=6, n_val=3)
    demo = in_copy(kit, "train_cutmix.py", *FAST, "--out", "runs/demo")
    trained_in_copy(demo, kit / "runs" / "demo", iters=6)
    assert len((kit / "runs" / "demo" / "labeled.txt").read_text().splitlines()) == 60
    folder = in_copy(kit, "train_cutmix.py", "--dataset", "folder", "--data-root", "data", "--arch", "unet_small",
                     "--no-pretrained", "--n-labeled", 3, *FAST, "--out", "runs/folder")
    trained_in_copy(folder, kit / "runs" / "folder", iters=6)
    resumed = in_copy(kit, "train_cutmix.py", "--out", "runs/demo", "--resume", "--iters", 9)
    assert "resumed from iteration 6" in resumed.stdout
    assert trained_in_copy(resumed, kit / "runs" / "demo", iters=9)["resumed_from"] == 6
    # the copy applies its trained run in Python: load_model, the network it scored (its teacher, as evaluated)
    loaded = in_copy(kit, "-c", "import common, json; net, info = common.load_model('runs/demo'); "
                                "print(json.dumps([info['arch'], info['num_classes'], info['iteration']]))")
    assert loaded.returncode == 0 and loaded.stdout.strip().splitlines()[-1] == '["unet_small", 5, 9]', loaded.stderr
    # the commands that use trained runs live in tools/, which the copy lacks: said in one line
    proc = in_copy(kit, "common.py", "predict", "runs/demo", "data/val/images", "--out", "pred")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "tools/" in proc.stderr and not (kit / "pred").exists()
    assert sorted(p.name for p in kit.iterdir() if p.name != "__pycache__") == [
        "common.py", "cutmixseg", "data", "runs", "train_cutmix.py"]
