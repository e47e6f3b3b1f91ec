"""The fault-injection suite behind scripts/fault-check: every stage that writes a folder (download, ingest,
tokenizer fit, tokenizer train-dvae, tokenize, pack, train, build) is killed with SIGKILL at several points, run on
a full disk, pointed at an output that is a file or a read-only folder, has an input deleted while it runs, is
given a second writer, and every reading stage is fed truncated and bit-flipped inputs. With --moto, the upload to
object storage (`pack --out s3://...`) is killed at several points of its own progress too (the bucket must never
show a half-written dataset, and a rerun must leave the clean pack's shards there), given a second writer, a full
disk and a read-only cache, and `train` on the uploaded dataset meets a full and a read-only shard cache.
Read-only folders are read-only tmpfs mounts where mounting is allowed, else chmod 555 (a root caller runs the
stage without CAP_DAC_OVERRIDE). One table row per case: expected and observed outcome. Exit status 1 when any
row fails. Standard library only (runs with the system python3).

    python3 scripts/fault_check.py --bin IMGLISH --serve SERVE [--moto PYTHON] [--short] [--work DIR]
                                   [--timeout S] [--only STAGE]

SERVE is the download tests' loopback HTTP server (download/examples/serve.rs); the download stage fetches from it.
PYTHON is an interpreter with moto installed (the project's torch venv): its S3 server runs on 127.0.0.1.
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import s3_server

ROWS = []
NOT_ENFORCEABLE = "as root that can neither mount nor drop CAP_DAC_OVERRIDE: not enforceable"


def row(stage, case, expected, observed, ok):
    ROWS.append((stage, case, expected, observed, "pass" if ok is True else ("skip" if ok is None else "FAIL")))
    mark = {True: "pass", None: "skip", False: "FAIL"}[ok]
    print(f"  {mark:4}  {stage:9} {case:34} {observed}", file=sys.stderr, flush=True)


class Ctx:
    def __init__(self, binary, work, timeout, short):
        self.bin, self.work, self.timeout, self.short = binary, work, timeout, short

    def run(self, argv, env=None, timeout=None, preexec=None):
        """Runs imglish to completion: (exit code or 'hang', stderr, seconds)."""
        started = time.monotonic()
        e = dict(os.environ, **(env or {}))
        try:
            p = subprocess.run([self.bin, *argv], cwd=self.work, env=e, capture_output=True, text=True,
                               timeout=timeout or self.timeout, preexec_fn=preexec)
            return p.returncode, p.stderr, time.monotonic() - started
        except subprocess.TimeoutExpired as t:
            err = t.stderr.decode() if isinstance(t.stderr, bytes) else (t.stderr or "")
            return "hang", err, time.monotonic() - started

    def spawn(self, argv):
        return subprocess.Popen([self.bin, *argv], cwd=self.work, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)


def tree(path, names=None):
    """sha256 of the visible files under `path` (dot-files are temporaries and locks), or of `names` only."""
    out = {}
    root = Path(path)
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            if names is None or rel in names:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Stage:
    """A writing stage: how to run it into `out`, how to rerun after an interruption, what must be identical."""

    def __init__(self, name, argv, marker, compare=None, rerun_extra=(), reads=None):
        self.name, self._argv, self.marker, self.compare = name, argv, marker, compare
        self.rerun_extra, self.reads = list(rerun_extra), reads

    def argv(self, out, rerun=False):
        return self._argv(out) + (self.rerun_extra if rerun else [])

    def outputs(self, ctx, out):
        names = self.compare(ctx.work / out) if callable(self.compare) else self.compare
        return tree(ctx.work / out, names)


def last_checkpoint_files(run_dir):
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    if not ckpts:
        return set()
    last = ckpts[-1].relative_to(run_dir).as_posix()
    return {f"{last}/model.safetensors", f"{last}/optimizer.safetensors", f"{last}/state.json"}


BUILD_TOML = """version = 1
[demo]
images = {images}
seed = 3
[ingest]
images = ["{{out}}/demo/images"]
captions = ["{{out}}/demo/captions/coco_captions.json"]
labels = "from-folders"
val_fraction = 0.25
[tokenizer.fit]
patch = 8
input_size = 32
codebook = 32
iterations = 4
[text_tokenizer.fit]
vocab_size = 300
[tokenize]
views = 2
part_samples = 16
[pack]
batch_rows = 16
"""


def stages(ctx):
    urls = ["--urls", "urls.csv", "--shard-size", "8", "--retries", "0", "--concurrency", "4", "--per-host", "4"]
    tok = ["--tokenizer", "tok/v.onnx", "--text-tokenizer", "tok/t.json", "--views", "2", "--part-samples", "8"]
    train = ["--steps", "40", "--batch-size", "8", "--dim", "32", "--depth", "2", "--heads", "2",
             "--checkpoint-every", "10", "--threads", "1"]
    dvae = ["--codebook", "16", "--input-size", "32", "--grid", "4", "--width", "8", "--steps", "24", "--batch-size",
            "4", "--checkpoint-every", "4", "--eval-every", "12", "--eval-images", "4", "--quantizer", "vq"]
    return [
        Stage("download", lambda o: ["-q", "download", *urls, "--out", o], "download.json",
              lambda d: {k for k in tree(d) if k.startswith("shard-") or k == "status.parquet"}),
        Stage("ingest", lambda o: ["-q", "ingest", "--images", "demo/images", "demo/shards/demo-00000.tar",
                                   "--captions", "demo/captions/coco_captions.json", "--labels", "from-folders",
                                   "--val-fraction", "0.25", "--out", o],
              "ingest.json", {"samples.parquet", "rejects.parquet", "classes.json"}, reads=None),
        Stage("fit", lambda o: ["-q", "tokenizer", "fit", "--manifest", "m", "--patch", "8", "--input-size", "32",
                                "--codebook", "32", "--iterations", "6", "--out", f"{o}/v.onnx"],
              "v.card.json", {"v.onnx", "v.card.json"}),
        Stage("dvae", lambda o: ["-q", "--threads", "1", "tokenizer", "train-dvae", "--manifest", "m", "--out",
                                 f"{o}/v.onnx", *dvae], "v.card.json", {"v.onnx", "v.decoder.onnx", "v.card.json"},
              rerun_extra=["--resume"]),
        Stage("tokenize", lambda o: ["-q", "--threads", "1", "tokenize", "--manifest", "m", *tok, "--out", o],
              "tokenize.json", None),
        Stage("pack", lambda o: ["-q", "pack", "--tokens", "t", "--manifest", "m", "--batch-rows", "8",
                                 "--target-shard-bytes", "4000", "--out", o],
              "index.json", None),
        Stage("train", lambda o: ["-q", "train", "--dataset", "d", "--out", o, *train],
              "checkpoints/step-00000040/state.json", last_checkpoint_files, rerun_extra=["--resume"]),
        Stage("build", lambda o: ["-q", "build", "b.toml", "--out", o],
              "dataset/build.json", lambda d: {k for k in tree(d) if k.startswith("dataset/")
                                               and k != "dataset/build.json"}),
    ]


def setup(ctx, all_stages):
    images = "40" if ctx.short else "80"
    code, err, _ = ctx.run(["-q", "demo-corpus", "--images", images, "--out", "demo"])
    assert code == 0, err
    (ctx.work / "b.toml").write_text(BUILD_TOML.format(images=images))
    # The clean runs: each stage's reference output (and the inputs of the next).
    inputs = {"download": "dl", "ingest": "m", "fit": "tok", "dvae": "clean-dvae", "tokenize": "t", "pack": "d",
              "train": "clean-train",
              "build": "clean-build"}
    clean = {}
    for s in all_stages:
        out = inputs[s.name]
        code, err, secs = ctx.run(s.argv(out))
        assert code == 0, f"clean {s.name}: {err}"
        if s.name == "fit":
            code, err, _ = ctx.run(["-q", "tokenizer", "fit-text", "--manifest", "m", "--vocab-size", "300",
                                    "--out", "tok/t.json"])
            assert code == 0, err
        clean[s.name] = (out, s.outputs(ctx, out), secs)
        print(f"  clean {s.name}: {secs:.2f}s, {len(clean[s.name][1])} files compared", file=sys.stderr)
    return clean


def one_line(err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def sane_failure(code, err, names=()):
    """Exit 1, no panic, an `error: ` line (verify adds one indented line per bad shard), naming one of `names`
    (when given), each OS cause once."""
    errors = [l for l in err.splitlines() if l.startswith("error: ")]
    if code != 1 or "panicked" in err or not errors:
        return False
    if names and not any(n in err for n in names):
        return False
    return all(l.count("(os error") <= 1 for l in err.splitlines())


def progress_argv(argv):
    """The stage's argv with JSON logs instead of `-q`, so that its progress records reach stderr."""
    return ["--log-format", "json", *[a for a in argv if a != "-q"]]


def run_until(ctx, argv, fraction, delay, phase=None):
    """Runs the stage and kills it (SIGKILL) at the first progress record of a counted phase (`phase` only, when
    given) at or past `fraction` of that phase (pos >= fraction * len, pos < len: mid-phase), or after `delay`
    seconds if no such record came first. Returns (killed, what triggered the kill)."""
    p = subprocess.Popen([ctx.bin, *progress_argv(argv)], cwd=ctx.work, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, IMGLISH_PROGRESS_SECS="0.005"))
    hit = []

    def watch():
        for line in p.stderr:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            pos, n = r.get("pos"), r.get("len")
            if "progress" in r and n and pos is not None and fraction * n <= pos < n and not hit \
                    and phase in (None, r["progress"]):
                hit.append(f"progress {pos}/{n} of {r['progress']!r}")
                p.kill()

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        if not hit:
            hit.append(f"{delay:.2f}s (the stage reports no counted progress there)")
        p.kill()
    p.wait()
    reader.join()
    killed = p.returncode == -signal.SIGKILL
    return killed, (hit[0] if hit else "")


def case_kill(ctx, s, clean, fraction, tag):
    """Kill -9 at a point of the stage's own progress (else of the clean run's time), rerun: identical output. A
    run that finishes before the kill point is tried again with half the delay; one that never gets killed is
    reported as skipped, never as passed."""
    out = f"k-{s.name}-{tag}"
    ref_out, ref, secs = clean[s.name]
    # First by the stage's progress alone (the run may take its time); a stage that reports no counted progress
    # past that point is then killed by time: the fraction of the clean run's time, halved on each miss.
    killed, trigger = run_until(ctx, s.argv(out), fraction, 10 * secs + 5)
    delay = max(0.02, secs * fraction)
    for _ in range(4):
        if killed:
            break
        shutil.rmtree(ctx.work / out, ignore_errors=True)
        killed, trigger = run_until(ctx, s.argv(out), 2.0, delay)
        delay /= 2
    case = f"kill -9 at {int(fraction * 100)}% then rerun"
    if not killed:
        row(s.name, case, "identical to a clean run", "finished before every kill point (4 tries)", None)
        return
    code, err, _ = ctx.run(s.argv(out, rerun=True))
    got = s.outputs(ctx, out)
    ok = code == 0 and got == ref
    row(s.name, case, "identical to a clean run",
        f"killed at {trigger}; rerun exit {code}, {'identical' if got == ref else 'DIFFERENT'}" + ("" if code == 0 else
                                                                                  f": {one_line(err)}"), ok)


def biggest_file(ctx, ref_out):
    sizes = [p.stat().st_size for p in (ctx.work / ref_out).rglob("*") if p.is_file()]
    return max(sizes) if sizes else 0


def can_mount():
    if os.geteuid() != 0:
        return False
    d = tempfile.mkdtemp()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", d], capture_output=True)
        return ok
    finally:
        os.rmdir(d)


class SmallDisk:
    """A disk too small for what a stage writes under `path`: a tmpfs of `size` bytes mounted there when mounting
    is allowed, else RLIMIT_FSIZE `limit` on the stage's process (`preexec`). `free()` makes room (remount;
    RLIMIT: the next run simply goes without `preexec`); `close()` unmounts."""

    def __init__(self, path, mount, size, limit):
        self.path, self.mount = path, mount
        path.mkdir(parents=True, exist_ok=True)
        self.preexec = None
        if mount:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
            self.how = f"tmpfs of {size} B"
        else:
            self.how = f"RLIMIT_FSIZE {limit} B"

            def preexec():
                import resource
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            self.preexec = preexec

    def free(self, size):
        if self.mount:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def close(self):
        if self.mount:
            subprocess.run(["umount", str(self.path)], capture_output=True)


def case_full_disk(ctx, s, clean, mount):
    ref_out, ref, _ = clean[s.name]
    out = f"full-{s.name}"
    total = sum(p.stat().st_size for p in (ctx.work / ref_out).rglob("*") if p.is_file())
    path = ctx.work / out
    disk = SmallDisk(path, mount, max(4096, total // 2), max(1024, biggest_file(ctx, ref_out) // 2))
    try:
        code, err, _ = ctx.run(s.argv(out), preexec=disk.preexec)
        marker = (path / s.marker).exists()
        visible = s.outputs(ctx, out)
        partial = [k for k, v in visible.items() if ref.get(k) != v and k in ref]
        ok1 = sane_failure(code, err) and ("No space left" in err or "File too large" in err) and not marker \
            and not partial
        row(s.name, "full disk", "exit 1, OS cause once, no marker, no partial file",
            f"{disk.how} (clean output {total} B): exit {code}, marker {'present' if marker else 'absent'}, "
            f"{len(partial)} partial; {one_line(err)[:90]}", ok1)
        disk.free(total * 4 + 65536)
        code, err, _ = ctx.run(s.argv(out, rerun=True))
        got = s.outputs(ctx, out)
        row(s.name, "full disk, space freed, rerun", "identical to a clean run",
            f"exit {code}, {'identical' if got == ref else 'DIFFERENT'}", code == 0 and got == ref)
    finally:
        disk.close()


def case_out_is_file(ctx, s):
    out = f"file-{s.name}"
    (ctx.work / out).write_text("not a folder\n")
    code, err, _ = ctx.run(s.argv(out))
    row(s.name, "output is a file", "exit 1, one line naming it", f"exit {code}: {one_line(err)[:100]}",
        sane_failure(code, err, [out]) and len(err.strip().splitlines()) == 1)


def drop_root_overrides():
    """preexec for a root caller without mount rights: drops the capabilities that let root write where the
    permission bits say no (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the child's bounding set, so a folder made
    read-only with chmod stops the stage as it would stop any user."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def can_drop_overrides():
    """Whether a child can run without CAP_DAC_OVERRIDE (needs CAP_SETPCAP, which root has outside unusual
    containers)."""
    try:
        return subprocess.run(["true"], preexec_fn=drop_root_overrides).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def read_only_folder(ctx, path, mount):
    """Makes `path` read-only (a read-only tmpfs when mounting is allowed, else chmod 555): (how, preexec, undo),
    or None when neither binds this caller (root that can neither mount nor drop CAP_DAC_OVERRIDE)."""
    path.mkdir(parents=True, exist_ok=True)
    if mount:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], check=True)
        return "read-only tmpfs", None, lambda: subprocess.run(["umount", str(path)], capture_output=True)
    root = os.geteuid() == 0
    if root and not can_drop_overrides():
        return None
    path.chmod(0o555)
    return ("chmod 555" + (" (root without CAP_DAC_OVERRIDE)" if root else ""),
            drop_root_overrides if root else None, lambda: path.chmod(0o755))


def case_read_only(ctx, s, mount):
    out = f"ro-{s.name}"
    ro = read_only_folder(ctx, ctx.work / out, mount)
    if ro is None:
        row(s.name, "read-only output folder", "exit 1, one line", NOT_ENFORCEABLE, None)
        return
    how, preexec, undo = ro
    try:
        code, err, _ = ctx.run(s.argv(out), preexec=preexec)
        row(s.name, "read-only output folder", "exit 1, one line naming it",
            f"{how}: exit {code}: {one_line(err)[:100]}",
            sane_failure(code, err, [out]) and len(err.strip().splitlines()) == 1)
    finally:
        undo()


def run_deleting(ctx, argv, victim, after):
    """Runs the stage, deletes `victim` `after` seconds in, waits: (exit code or 'hang', stderr)."""
    p = subprocess.Popen([ctx.bin, *argv], cwd=ctx.work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(max(0.01, after))
    victim.unlink()
    try:
        _, err = p.communicate(timeout=ctx.timeout)
        return p.returncode, err
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        return "hang", err


def case_input_deleted(ctx, s, clean, source, pattern=None):
    """Deletes an input once the stage is running, from a copy of `source`: the last file matching `pattern` in
    that folder, or (no pattern) the file itself (download's URL list, build's config: both read whole at the
    start). Exit 1 naming it, or (if it was read already) a result identical to a clean run; never a panic, a
    hang or a wrong result."""
    ref_out, ref, secs = clean[s.name]
    if pattern:
        copy = f"in-{s.name}"
        shutil.rmtree(ctx.work / copy, ignore_errors=True)
        shutil.copytree(ctx.work / source, ctx.work / copy)
        victim = sorted((ctx.work / copy).glob(pattern))[-1]
        label = victim.name
    else:
        copy = f"in-{s.name}-{source}"
        shutil.copyfile(ctx.work / source, ctx.work / copy)
        victim, label = ctx.work / copy, source
    argv = [copy if a == source else a for a in s.argv(f"del-{s.name}")]
    code, err = run_deleting(ctx, argv, victim, secs * 0.3)
    got = s.outputs(ctx, f"del-{s.name}")
    ok = sane_failure(code, err, [victim.name]) or (code == 0 and got == ref)
    row(s.name, f"input deleted mid-run ({label})", "exit 1 naming it, or identical output",
        f"exit {code}: {one_line(err)[:100] if code != 0 else ('identical' if got == ref else 'DIFFERENT')}", ok)


def case_image_deleted(ctx, s, clean):
    """ingest, tokenizer fit, train-dvae and tokenize: an image file deleted while the stage runs (from a copy of
    the demo corpus) is either read before (fit, train-dvae: output identical to the clean run), or becomes a
    reject with its reason (counted, nothing lost), or an exit 1 naming it; never a panic, a hang or a silently
    shorter output."""
    base = ctx.work / f"in-{s.name}"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(ctx.work / "demo", base / "demo")
    # ingest: the last image file of the folder source; the others: the tar the manifest's accepted images mostly
    # come from (the folder's copies are duplicates of the tar's members).
    victim = sorted((base / "demo" / "images").rglob("*.png"))[-1] if s.name == "ingest" else \
        base / "demo" / "shards" / "demo-00000.tar"
    out = f"del-{s.name}"
    if s.name == "ingest":
        argv = [a.replace("demo/", f"{base.name}/demo/", 1) if a.startswith("demo/") else a for a in s.argv(out)]
    else:
        manifest = f"in-{s.name}-m"
        shutil.rmtree(ctx.work / manifest, ignore_errors=True)
        shutil.copytree(ctx.work / "m", ctx.work / manifest)
        record = json.loads((ctx.work / manifest / "ingest.json").read_text())
        record["base_dir"] = str(base)
        (ctx.work / manifest / "ingest.json").write_text(json.dumps(record))
        argv = [manifest if a == "m" else a for a in s.argv(out)]
    secs = clean[s.name][2]
    code, err = run_deleting(ctx, argv, victim, secs * 0.3)
    what = f"exit {code}: {one_line(err)[:100]}"
    ok = sane_failure(code, err, [victim.name])
    if code == 0 and s.name in ("fit", "dvae"):
        # A tokenizer trained on the same manifest: the same files as the clean run (it read the file first).
        same = s.outputs(ctx, out) == clean[s.name][1]
        ok, what = same, f"exit 0: {'identical' if same else 'DIFFERENT'} to the clean run"
    elif code == 0:
        ref_dir = ctx.work / clean[s.name][0]
        if s.name == "ingest":
            want = json.loads((ref_dir / "ingest.json").read_text())["counts"]
            got = json.loads((ctx.work / out / "ingest.json").read_text())["counts"]
            ok = got["seen"] == want["seen"] and got["accepted"] + got["rejected"] == got["seen"] \
                and got["rejected"] - want["rejected"] in (0, 1)
            what = f"exit 0: {got['seen']} seen, {got['accepted']} accepted, {got['rejected']} rejected (clean run: " \
                f"{want['accepted']} / {want['rejected']})"
        else:
            want = json.loads((ref_dir / "tokenize.json").read_text())
            got = json.loads((ctx.work / out / "tokenize.json").read_text())
            n = lambda r: sum(r["counts"].values())  # noqa: E731
            ok = got["rejected"] >= want["rejected"] and n(got) + got["rejected"] == n(want) + want["rejected"]
            what = f"exit 0: {n(got)} tokenized, {got['rejected']} rejected (clean run: {n(want)} / {want['rejected']})"
    row(s.name, f"image deleted mid-run ({victim.name})", "read, counted rejects, or exit 1 naming it", what, ok)


def holds_lock(pid):
    try:
        return any(f" {pid} " in line for line in Path("/proc/locks").read_text().splitlines() if "FLOCK" in line)
    except OSError:
        return False


def wait_or_hang(p, timeout):
    """`p`'s exit code, or "hang" (after killing it) when it runs past `timeout`: the row reports the hang
    instead of the suite crashing."""
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return "hang"


def case_two_writers(ctx, s, clean):
    ref_out, ref, _ = clean[s.name]
    out = f"two-{s.name}"
    first = ctx.spawn(s.argv(out))
    deadline = time.monotonic() + ctx.timeout
    while not holds_lock(first.pid) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    if first.poll() is not None:
        row(s.name, "second writer", "refused at once", "the first finished before it could be paused", False)
        return
    first.send_signal(signal.SIGSTOP)
    try:
        code, err, secs = ctx.run(s.argv(out), timeout=30)
    finally:
        first.send_signal(signal.SIGCONT)
    first_code = wait_or_hang(first, ctx.timeout)
    got = s.outputs(ctx, out)
    ok = code == 1 and f"another imglish process (pid {first.pid}) is writing" in err and secs < 10 \
        and first_code == 0 and got == ref
    row(s.name, "second writer", "refused at once; first unharmed",
        f"second exit {code} in {secs:.1f}s; first exit {first_code}, "
        f"{'identical' if got == ref else 'DIFFERENT'}", ok)


BUCKET = "fault"


def upload_argv(tag):
    return ["-q", "pack", "--tokens", "t", "--manifest", "m", "--batch-rows", "8", "--target-shard-bytes", "4000",
            "--out", f"s3://{BUCKET}/{tag}", "--cache-dir", f"up-{tag}"]


def remote_shards(ctx, tag, check):
    """verify of s3://BUCKET/TAG into a fresh cache: (exit code, stderr, {shard file: sha256} of what it fetched)."""
    code, err, _ = ctx.run(["-q", "verify", f"s3://{BUCKET}/{tag}", "--cache-dir", check])
    dirs = [d for d in (ctx.work / check).iterdir() if d.is_dir()] if (ctx.work / check).is_dir() else []
    return code, err, {k: v for d in dirs for k, v in tree(d).items() if k.startswith("shard-")}


def case_upload(ctx, clean_secs, fraction, tag, phase):
    """Kill -9 of `pack --out s3://...` at `fraction` of its `phase` (packing into the staging folder, or
    uploading), by its own progress records; a run never caught in that phase is a skip, not a pass."""
    ref = {k: v for k, v in tree(ctx.work / "d").items() if k.startswith("shard-")}
    base = tag
    for attempt in range(4):  # progress records come every 5 ms: a short phase may slip between two of them
        tag = f"{base}-{attempt}"  # a fresh URL and staging folder: a finished try leaves a complete dataset
        killed, trigger = run_until(ctx, upload_argv(tag), fraction, 10 * clean_secs + 5, phase)
        if killed:
            break
    case = f"kill -9 at {int(fraction * 100)}% of {phase} then rerun"
    if not killed:
        row("upload", case, "never half-visible; then the clean shards", f"never caught {phase} (4 tries)", None)
        return
    # Never half-visible: right after the kill the URL holds no dataset (no index.json) or a complete one.
    code, err, got = remote_shards(ctx, tag, f"seen-{tag}")
    visible = "complete" if code == 0 and got == ref else ("absent" if code == 1 and "index.json" in err
                                                           else "HALF-WRITTEN")
    rerun, rerr, _ = ctx.run(upload_argv(tag))
    code, err, got = remote_shards(ctx, tag, f"check-{tag}")
    ok = visible != "HALF-WRITTEN" and rerun == 0 and code == 0 and got == ref
    row("upload", case, "never half-visible; then the clean shards",
        f"killed at {trigger}; dataset {visible} after the kill; rerun exit "
        f"{rerun}, verify exit {code}, {'identical' if got == ref else 'DIFFERENT'}"
        + ("" if rerun == 0 else f": {one_line(rerr)}"), ok)


def case_upload_two_writers(ctx):
    tag = "two-upload"
    ref = {k: v for k, v in tree(ctx.work / "d").items() if k.startswith("shard-")}
    first = ctx.spawn(upload_argv(tag))
    deadline = time.monotonic() + ctx.timeout
    while not holds_lock(first.pid) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    if first.poll() is not None:
        row("upload", "second writer", "refused at once", "the first finished before it could be paused", False)
        return
    first.send_signal(signal.SIGSTOP)
    try:
        code, err, secs = ctx.run(upload_argv(tag), timeout=30)
    finally:
        first.send_signal(signal.SIGCONT)
    first_code = wait_or_hang(first, ctx.timeout)
    vcode, _, got = remote_shards(ctx, tag, f"check-{tag}")
    ok = code == 1 and f"another imglish process (pid {first.pid}) is writing" in err and secs < 10 \
        and first_code == 0 and vcode == 0 and got == ref
    row("upload", "second writer", "refused at once; first unharmed",
        f"second exit {code} in {secs:.1f}s; first exit {first_code}, verify exit {vcode}, "
        f"{'identical' if got == ref else 'DIFFERENT'}", ok)


def case_upload_full_disk(ctx, mount):
    """`pack --out s3://...` with its staging folder (under --cache-dir) on a full disk: exit 1 with the OS cause,
    nothing at the URL; with space freed the rerun uploads the clean shards."""
    tag = "full-upload"
    ref = {k: v for k, v in tree(ctx.work / "d").items() if k.startswith("shard-")}
    total = sum(p.stat().st_size for p in (ctx.work / "d").rglob("*") if p.is_file())
    disk = SmallDisk(ctx.work / f"up-{tag}", mount, max(4096, total // 2), max(1024, biggest_file(ctx, "d") // 2))
    try:
        code, err, _ = ctx.run(upload_argv(tag), preexec=disk.preexec)
        vcode, verr, _ = remote_shards(ctx, tag, f"seen-{tag}")
        absent = vcode == 1 and "index.json" in verr
        ok = sane_failure(code, err) and ("No space left" in err or "File too large" in err) and absent
        row("upload", "full disk (staging folder)", "exit 1, OS cause once, nothing at the URL",
            f"{disk.how} (dataset {total} B): exit {code}, dataset {'absent' if absent else 'PRESENT'}; "
            f"{one_line(err)[:90]}", ok)
        disk.free(total * 4 + 65536)
        code, err, _ = ctx.run(upload_argv(tag))
        vcode, _, got = remote_shards(ctx, tag, f"check-{tag}")
        row("upload", "full disk, space freed, rerun", "the clean shards at the URL",
            f"exit {code}, verify exit {vcode}, {'identical' if got == ref else 'DIFFERENT'}",
            code == 0 and vcode == 0 and got == ref)
    finally:
        disk.close()


def case_upload_read_only(ctx, mount):
    tag = "ro-upload"
    ro = read_only_folder(ctx, ctx.work / f"up-{tag}", mount)
    if ro is None:
        row("upload", "read-only --cache-dir", "exit 1, one line", NOT_ENFORCEABLE, None)
        return
    how, preexec, undo = ro
    try:
        code, err, _ = ctx.run(upload_argv(tag), preexec=preexec)
    finally:
        undo()
    vcode, verr, _ = remote_shards(ctx, tag, f"seen-{tag}")
    absent = vcode == 1 and "index.json" in verr
    row("upload", "read-only --cache-dir", "exit 1, one line naming it, nothing at the URL",
        f"{how}: exit {code}, dataset {'absent' if absent else 'PRESENT'}: {one_line(err)[:100]}",
        sane_failure(code, err, [f"up-{tag}"]) and len(err.strip().splitlines()) == 1 and absent)


def remote_train_argv(s, out, cache):
    """`train` of the stage list on the uploaded dataset instead of the local one, caching into `cache`."""
    return [f"s3://{BUCKET}/clean-upload" if a == "d" else a for a in s.argv(out)] + ["--cache-dir", cache]


def case_remote_read(ctx, s, clean, mount):
    """`train --dataset s3://...` with its shard cache on a full disk, then read-only: exit 1 with the cause;
    with space freed the rerun trains the same weights as the clean (local) run."""
    ref = clean["train"][1]
    smallest = min(p.stat().st_size for p in (ctx.work / "d").glob("shard-*.arrow"))
    disk = SmallDisk(ctx.work / "rr-full-cache", mount, 4096, max(512, smallest // 2))
    try:
        code, err, _ = ctx.run(remote_train_argv(s, "rr-full", "rr-full-cache"), preexec=disk.preexec)
        ok = sane_failure(code, err) and ("No space left" in err or "File too large" in err) \
            and not (ctx.work / "rr-full" / s.marker).exists()
        row("train (remote)", "full shard cache", "exit 1, OS cause once, no checkpoint marker",
            f"{disk.how} (smallest shard {smallest} B): exit {code}; {one_line(err)[:100]}", ok)
        disk.free(16 << 20)
        code, err, _ = ctx.run(remote_train_argv(s, "rr-full", "rr-full-cache"))
        got = s.outputs(ctx, "rr-full")
        row("train (remote)", "full shard cache, space freed, rerun", "the clean (local) run's weights",
            f"exit {code}, {'identical' if got == ref else 'DIFFERENT'}" + (f": {one_line(err)}" if code else ""),
            code == 0 and got == ref)
    finally:
        disk.close()
    ro = read_only_folder(ctx, ctx.work / "rr-ro-cache", mount)
    if ro is None:
        row("train (remote)", "read-only --cache-dir", "exit 1, one line", NOT_ENFORCEABLE, None)
        return
    how, preexec, undo = ro
    try:
        code, err, _ = ctx.run(remote_train_argv(s, "rr-ro", "rr-ro-cache"), preexec=preexec)
    finally:
        undo()
    row("train (remote)", "read-only --cache-dir", "exit 1, one line naming it",
        f"{how}: exit {code}: {one_line(err)[:100]}",
        sane_failure(code, err, ["rr-ro-cache"]) and len(err.strip().splitlines()) == 1)


def case_remote(ctx, fractions, mount, train):
    code, err, secs = ctx.run(upload_argv("clean-upload"))
    assert code == 0, f"clean upload: {err}"
    points = [(f, "uploading") for f in fractions] + ([] if ctx.short else [(0.5, "packing")])
    for i, (f, phase) in enumerate(points):
        case_upload(ctx, secs, f, f"k-{i}", phase)
    case_upload_two_writers(ctx)
    case_upload_full_disk(ctx, mount)
    case_upload_read_only(ctx, mount)
    if train:
        case_remote_read(ctx, train[0], train[1], mount)


def corrupt_copy(ctx, src, dst, target, how):
    shutil.rmtree(ctx.work / dst, ignore_errors=True)
    shutil.copytree(ctx.work / src, ctx.work / dst)
    p = ctx.work / dst / target
    data = bytearray(p.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
            data[i] ^= 0xFF
    p.write_bytes(bytes(data))


def case_corrupt_inputs(ctx):
    shard = sorted(p.name for p in (ctx.work / "d").glob("shard-*.arrow"))[0]
    part = sorted(p.name for p in (ctx.work / "t").glob("part-*.parquet"))[0]
    cases = [
        ("tokenize", "m", "samples.parquet",
         lambda src: ["-q", "tokenize", "--manifest", src, "--tokenizer", "tok/v.onnx", "--text-tokenizer",
                      "tok/t.json", "--views", "2", "--out", f"c-{src}"]),
        ("tokenize", "tok", "v.onnx",
         lambda src: ["-q", "tokenize", "--manifest", "m", "--tokenizer", f"{src}/v.onnx", "--out", f"c-{src}"]),
        ("pack", "t", part, lambda src: ["-q", "pack", "--tokens", src, "--out", f"c-{src}"]),
        ("verify", "d", shard, lambda src: ["-q", "verify", src]),
        ("inspect", "d", shard, lambda src: ["-q", "inspect", src]),
        ("train", "d", shard, lambda src: ["-q", "train", "--dataset", src, "--out", f"c-{src}", "--steps", "30",
                                           "--batch-size", "8", "--dim", "32", "--depth", "1", "--heads", "2"]),
        # The JSON every stage reads back: a manifest's, a token folder's and a dataset's records, a tokenizer's
        # card.
        ("tokenize", "m", "ingest.json",
         lambda src: ["-q", "tokenize", "--manifest", src, "--tokenizer", "tok/v.onnx", "--out", f"c-{src}"]),
        ("tokenize", "tok", "v.card.json",
         lambda src: ["-q", "tokenize", "--manifest", "m", "--tokenizer", f"{src}/v.onnx", "--out", f"c-{src}"]),
        ("pack", "t", "tokenize.json", lambda src: ["-q", "pack", "--tokens", src, "--out", f"c-{src}"]),
        ("verify", "d", "index.json", lambda src: ["-q", "verify", src]),
        ("train", "d", "index.json", lambda src: ["-q", "train", "--dataset", src, "--out", f"c-{src}", "--steps",
                                                  "30", "--batch-size", "8", "--dim", "32", "--depth", "1",
                                                  "--heads", "2"]),
    ]
    # A run's newest checkpoint, damaged, met by `train --resume`, `probe` and `embed`.
    train_args = ["--batch-size", "8", "--dim", "32", "--depth", "2", "--heads", "2", "--checkpoint-every", "10",
                  "--threads", "1"]
    if (ctx.work / "clean-train").exists():
        last = sorted(p.name for p in (ctx.work / "clean-train" / "checkpoints").glob("step-*"))[-1]
        for name in ("state.json", "model.safetensors", "optimizer.safetensors"):
            target = f"checkpoints/{last}/{name}"
            cases.append(("train --resume", "clean-train", target,
                          lambda src: ["-q", "train", "--dataset", "d", "--out", src, *train_args, "--steps", "50",
                                       "--resume"]))
        for name in ("state.json", "model.safetensors"):
            target = f"checkpoints/{last}/{name}"
            cases.append(("probe", "clean-train", target,
                          lambda src: ["-q", "probe", "--checkpoint", src, "--dataset", "d"]))
            cases.append(("embed", "clean-train", target,
                          lambda src: ["-q", "embed", "--checkpoint", src, "--dataset", "d", "--out",
                                       f"e-{src}.parquet"]))
    for i, (stage, src, target, argv) in enumerate(cases):
        for how in ("truncated", "bit-flipped"):
            # A folder name that does not contain the file's: the error must name the file itself.
            dst = f"corrupt-{i}-{how}"
            corrupt_copy(ctx, src, dst, target, how)
            code, err, _ = ctx.run(argv(dst))
            ok = sane_failure(code, err, [Path(target).name])
            row(stage, f"{how} {target}", "exit 1 naming the file", f"exit {code}: {one_line(err)[:100]}", ok)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--serve", required=True, help="the loopback HTTP server binary (download/examples/serve.rs)")
    ap.add_argument("--moto", help="a Python with moto installed: adds the upload (pack --out s3://) cases")
    ap.add_argument("--only", action="append", help="run only this stage's cases (repeatable)")
    ap.add_argument("--short", action="store_true", help="one kill point per stage, no build cases (CI)")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--no-mount", action="store_true", help="full disk through RLIMIT_FSIZE even when tmpfs "
                    "mounts are allowed")
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="imglish-fault-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(os.path.abspath(a.bin), work.resolve(), a.timeout, a.short)
    started = time.monotonic()
    server = subprocess.Popen([os.path.abspath(a.serve), str(work / "server"), "16"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(server.stdout.readline())
        # 48 URLs that each take 150 ms to answer (4 at a time: about 2 s), 4 missing.
        lines = [f"http://127.0.0.1:{port}/{'404' if i % 12 == 11 else 'delay'}/{i},picture {i}" for i in range(48)]
        (work / "urls.csv").write_text("url,caption\n" + "\n".join(lines) + "\n")
        all_stages = stages(ctx)
        if a.short:
            all_stages = [s for s in all_stages if s.name != "build"]
        if a.only:
            all_stages = [s for s in all_stages if s.name in a.only]
        clean = setup(ctx, all_stages)
        mount = can_mount() and not a.no_mount
        fractions = [0.5] if a.short else [0.15, 0.5, 0.9]
        for s in all_stages:
            for i, f in enumerate(fractions):
                case_kill(ctx, s, clean, f, str(i))
            case_full_disk(ctx, s, clean, mount)
            case_out_is_file(ctx, s)
            case_read_only(ctx, s, mount)
            case_two_writers(ctx, s, clean)
        by_name = {s.name: s for s in all_stages}
        if "pack" in by_name:
            case_input_deleted(ctx, by_name["pack"], clean, "t", "part-*.parquet")
        if "train" in by_name:
            case_input_deleted(ctx, by_name["train"], clean, "d", "shard-*.arrow")
        for name in ("ingest", "fit", "dvae", "tokenize"):
            if name in by_name:
                case_image_deleted(ctx, by_name[name], clean)
        for name, file in (("download", "urls.csv"), ("build", "b.toml")):
            if name in by_name:
                case_input_deleted(ctx, by_name[name], clean, file)
        if not a.only:
            case_corrupt_inputs(ctx)
        if a.moto and "pack" in by_name:
            moto, env = s3_server.start(a.moto, BUCKET)
            os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
            try:
                case_remote(ctx, fractions, mount, (by_name["train"], clean) if "train" in by_name else None)
            finally:
                s3_server.stop(moto)
    finally:
        server.stdin.close()
        server.wait()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print("| stage | case | expected | observed | result |")
    print("|---|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    failed = [r for r in ROWS if r[4] == "FAIL"]
    skipped = [r for r in ROWS if r[4] == "skip"]
    print(f"\n{len(ROWS)} cases, {len(failed)} failed, {len(skipped)} skipped "
          f"({time.monotonic() - started:.0f}s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
