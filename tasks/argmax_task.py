"""`python ./tasks/argmax_task.py ...`, as pytorch-dnc's README spells it: runs the top-level argmax_task.py."""

import sys

if __name__ == "__main__":
    # First of all: the repository, not tasks/ (whose copy.py would shadow the standard library's), on the path.
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path[0] = str(root)
    import runpy

    runpy.run_path(str(root / "argmax_task.py"), run_name="__main__")
