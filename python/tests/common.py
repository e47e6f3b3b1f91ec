"""Shared by the Python tests: the imglish binary, and a small BEiT-3 dataset made by `imglish quickstart`."""

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile

_DATASET = None
_TMP = None


def imglish_bin():
    """The binary `cargo test` built (scripts/test passes IMGLISH_BIN)."""
    path = os.environ.get("IMGLISH_BIN") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/imglish/target")), "debug", "imglish"
    )
    if not os.path.exists(path):
        raise RuntimeError(f"the imglish binary is not at {path}: run the tests with scripts/test")
    return path


def descendants(pid):
    """Every process below ``pid`` (torchrun starts each rank in a session of its own, so a process group kill
    does not reach them)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid):
    """SIGKILL ``pid`` and everything below it, at once (as a node failure would)."""
    for p in [pid] + descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(args, timeout=600):
    """Runs a command in its own session; on timeout the whole group (torchrun and its ranks) is killed."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        err += f"\n(killed after {timeout} s)"
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def dataset():
    """A BEiT-3 quickstart dataset (images with captions, texts; 96 samples), made once per test process."""
    global _DATASET, _TMP
    if _DATASET is None:
        _TMP = tempfile.mkdtemp(prefix="imglish-py-")
        atexit.register(shutil.rmtree, _TMP, True)
        out = os.path.join(_TMP, "qs")
        r = run(
            [imglish_bin(), "quickstart", "--model", "beit3", "--out", out, "--images", "96", "--views", "2"]
            + ["--steps", "1", "--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", "8"]
        )
        if r.returncode != 0:
            raise RuntimeError(f"quickstart failed: {r.stderr}")
        _DATASET = os.path.join(out, "dataset")
    return _DATASET


def tmpdir(test):
    d = tempfile.mkdtemp(prefix="imglish-py-")
    test.addCleanup(shutil.rmtree, d, True)
    return d


PYTHON = sys.executable
