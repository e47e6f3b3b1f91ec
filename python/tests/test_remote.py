"""Remote datasets against a real S3-compatible server (moto, started on 127.0.0.1 by the test and stopped after):
`pack --out s3://...` uploads (shards first, index.json last); `verify`, `train` and the Python reader read the
dataset from the URL through the shard cache; a training run killed (SIGKILL) and resumed on the remote dataset
equals an uninterrupted run on the local copy; the cache never holds more than its limit; a damaged object is named by
`verify`."""

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

import boto3
from safetensors.torch import load_file

import imglish
from common import dataset, imglish_bin, tmpdir

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import s3_server  # noqa: E402

BUCKET = "imglish-test"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


class RemoteTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="imglish-py-")
        cls.addClassCleanup(shutil.rmtree, cls.dir, True)
        cls.server, cls.env = s3_server.start(sys.executable, BUCKET)
        cls.addClassCleanup(s3_server.stop, cls.server)
        endpoint = cls.env["AWS_ENDPOINT_URL"]
        os.environ.update({k: v for k, v in cls.env.items() if k.startswith("AWS_")})
        cls.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                              aws_secret_access_key="test")
        # The quickstart dataset's tokens, packed into small shards both locally and to the bucket.
        qs = os.path.dirname(dataset())
        cls.local = os.path.join(cls.dir, "local")
        cls.url = f"s3://{BUCKET}/datasets/demo"
        pack = ["pack", "--tokens", os.path.join(qs, "tokens"), "--manifest", os.path.join(qs, "manifest"),
                "--target-shard-bytes", "6000", "--batch-rows", "8", "--cache-dir", os.path.join(cls.dir, "staging")]
        for out in (cls.local, cls.url):
            r = cls.imglish(pack + ["--out", out])
            if r.returncode != 0:
                raise RuntimeError(f"pack --out {out} failed: {r.stderr}")
        with open(os.path.join(cls.local, "index.json")) as f:
            cls.index = json.load(f)
        assert len(cls.index["shards"]) >= 4, len(cls.index["shards"])

    @classmethod
    def imglish(cls, args, timeout=600):
        return run_env([imglish_bin()] + args, cls.env, timeout)

    def test_upload_is_complete_and_verifies(self):
        keys = {o["Key"]: o["Size"] for o in self.s3.list_objects_v2(Bucket=BUCKET, Prefix="datasets/demo/")
                ["Contents"]}
        want = {f"datasets/demo/{s['file']}": s["bytes"] for s in self.index["shards"]}
        self.assertEqual({k: v for k, v in keys.items() if not k.endswith("index.json")}, want)
        body = self.s3.get_object(Bucket=BUCKET, Key="datasets/demo/index.json")["Body"].read()
        with open(os.path.join(self.local, "index.json"), "rb") as f:
            self.assertEqual(body, f.read())
        r = self.imglish(["verify", self.url, "--cache-dir", tmpdir(self)])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"{len(self.index['shards'])} shards", r.stdout)
        # The Python reader opens the URL too.
        imglish.set_cache(cache_dir=tmpdir(self), cache_limit=1 << 30)
        remote, local = imglish.Dataset(self.url), imglish.Dataset(self.local)
        self.assertEqual(len(remote), len(local))
        self.assertEqual(remote.stats(), local.stats())
        self.assertTrue(remote.verify()["ok"])

    def test_training_resumed_on_the_remote_dataset_equals_local_and_the_cache_keeps_its_limit(self):
        d = tmpdir(self)
        # One thread: with more, libtorch's CPU kernels may round differently from one process to the next on a
        # loaded machine, and this compares weights bit for bit (README, "Train and probe").
        args = ["--threads", "1", "train", "--steps", "30", "--batch-size", "8", "--dim", "32", "--depth", "1",
                "--heads", "2", "--model", "beit3", "--eval-samples", "8"]
        r = self.imglish(args + ["--dataset", self.local, "--out", os.path.join(d, "local")])
        self.assertEqual(r.returncode, 0, r.stderr)
        sizes = sorted(s["bytes"] for s in self.index["shards"])
        limit = sizes[-1] + sizes[-2] + sizes[-3]
        cache = os.path.join(d, "cache")
        peak = [0]
        done = threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], folder_bytes(cache))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            remote = args + ["--dataset", self.url, "--out", os.path.join(d, "remote"), "--cache-dir", cache,
                             "--cache-limit", str(limit)]
            # Killed (SIGKILL) once its step-2 checkpoint is complete, then resumed.
            proc = subprocess.Popen([imglish_bin()] + remote + ["--checkpoint-every", "2"], env=self.env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            state = os.path.join(d, "remote", "checkpoints", "step-00000002", "state.json")
            deadline = time.time() + 300
            while not os.path.exists(state) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.assertTrue(os.path.exists(state))
            self.assertEqual(proc.returncode, -signal.SIGKILL)
            self.assertFalse(os.path.exists(os.path.join(d, "remote", "checkpoints", "step-00000030")))
            r = self.imglish(remote + ["--resume"])
            self.assertEqual(r.returncode, 0, r.stderr)
            # verify reads every shard: more than the cache holds, so shards are evicted on the way.
            self.assertGreater(sum(sizes), limit)
            r = self.imglish(["verify", self.url, "--cache-dir", cache, "--cache-limit", str(limit)])
            self.assertEqual(r.returncode, 0, r.stderr)
        finally:
            done.set()
            watcher.join()
        self.assertGreater(peak[0], 0)
        self.assertLessEqual(peak[0], limit)
        r = self.imglish(["probe", "--checkpoint", os.path.join(d, "remote"), "--dataset", self.url, "--cache-dir",
                          cache])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("probe", r.stdout)
        last = os.path.join("checkpoints", "step-00000030", "model.safetensors")
        a, b = (load_file(os.path.join(d, x, last)) for x in ("local", "remote"))
        self.assertEqual(sorted(a), sorted(b))
        for k in a:
            self.assertTrue((a[k] == b[k]).all(), k)

    def test_a_damaged_object_is_named(self):
        url = f"s3://{BUCKET}/datasets/damaged"
        for s in self.index["shards"] + [{"file": "index.json"}]:
            with open(os.path.join(self.local, s["file"]), "rb") as f:
                body = bytearray(f.read())
            if s["file"] == self.index["shards"][1]["file"]:
                body[len(body) // 2] ^= 0x40
            self.s3.put_object(Bucket=BUCKET, Key=f"datasets/damaged/{s['file']}", Body=bytes(body))
        r = self.imglish(["verify", url, "--cache-dir", tmpdir(self)])
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        bad = self.index["shards"][1]["file"]
        self.assertIn(f"shard {bad}: the object {url}/{bad} is", r.stdout + r.stderr)
        self.assertIn("changed or damaged after packing", r.stdout + r.stderr)

    def test_https_style_url_and_inspect(self):
        """A dataset served over plain HTTP (a static file server on 127.0.0.1) reads like a bucket."""
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port)],
                                  cwd=os.path.dirname(self.local), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}/{os.path.basename(self.local)}"
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"{url}/index.json", timeout=1)
                    break
                except OSError:
                    time.sleep(0.05)
            r = self.imglish(["verify", url, "--cache-dir", tmpdir(self)])
            self.assertEqual(r.returncode, 0, r.stderr)
            remote = self.imglish(["inspect", self.url, "--cache-dir", tmpdir(self)])
            self.assertEqual(remote.returncode, 0, remote.stderr)
            local = self.imglish(["inspect", self.local])
            self.assertEqual(local.returncode, 0, local.stderr)
            self.assertEqual(remote.stdout.replace(self.url, "DS"), local.stdout.replace(self.local, "DS"))
        finally:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    def test_build_uploads_its_dataset(self):
        d = tmpdir(self)
        with open(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "build", "demo.toml")) as f:
            config = f.read().replace("images = 240", "images = 40")
        url = f"s3://{BUCKET}/builds/demo"
        with open(os.path.join(d, "b.toml"), "w") as f:
            f.write(config + f'\n[upload]\nurl = "{url}"\n')
        r = self.imglish(["build", os.path.join(d, "b.toml"), "--out", os.path.join(d, "out")])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("build: uploaded", r.stdout)
        r = self.imglish(["verify", url, "--cache-dir", tmpdir(self)])
        self.assertEqual(r.returncode, 0, r.stderr)
        body = self.s3.get_object(Bucket=BUCKET, Key="builds/demo/build.json")["Body"].read()
        with open(os.path.join(d, "out", "dataset", "build.json"), "rb") as f:
            self.assertEqual(body, f.read())
        r = self.imglish(["build", os.path.join(d, "b.toml"), "--out", os.path.join(d, "out")])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"build: upload to {url} up to date (skipped)", r.stdout)

    def test_a_second_process_gets_a_cache_folder_of_its_own(self):
        cache = tmpdir(self)
        key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        os.makedirs(os.path.join(cache, key))
        with open(os.path.join(cache, key, "keep"), "w") as f:
            f.write("another process's file")
        fd = os.open(os.path.join(cache, key), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            r = self.imglish(["verify", self.url, "--cache-dir", cache])
            self.assertEqual(r.returncode, 0, r.stderr)
        finally:
            os.close(fd)
        # The held folder is untouched (a reader cleans only its own); the verify used the next one.
        self.assertEqual(os.listdir(os.path.join(cache, key)), ["keep"])
        self.assertEqual(sorted(os.listdir(cache)), [key, f"{key}-1"])

    def test_refusals(self):
        r = self.imglish(["verify", f"s3://{BUCKET}/nothing-here", "--cache-dir", tmpdir(self)])
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"s3://{BUCKET}/nothing-here/index.json", r.stderr)
        r = self.imglish(["verify", self.url, "--cache-dir", tmpdir(self), "--cache-limit", "1K"])
        self.assertEqual(r.returncode, 1)
        self.assertIn("the shard cache limit (1024 bytes) is smaller than the largest shard", r.stderr)


def run_env(args, env, timeout):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(killed after {timeout} s)"
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


if __name__ == "__main__":
    unittest.main()
