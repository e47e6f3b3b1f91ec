"""A moto S3 server on 127.0.0.1 for tests and benchmarks (scripts/fault_check.py, python/tests/test_remote.py,
python/bench/bench_remote.py). Standard library only: moto runs in the interpreter given (one that has it
installed, such as the project's torch venv).

    server, env = start(python, "bucket")   # env: the AWS_* variables imglish needs to reach it
    ...
    stop(server)
"""

import os
import signal
import socket
import subprocess
import time
import urllib.request


def start(python, bucket):
    """Starts moto on a free port, waits until it answers, creates `bucket` (moto accepts an unsigned PUT);
    returns the process and the environment (a copy of os.environ with AWS_* set) to run imglish with."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"moto did not start ({python} -m moto.server exited {server.returncode})")
            time.sleep(0.05)
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=10)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1",
               AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true")
    return server, env


def stop(server):
    """Kills the server's process group and reaps it."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()
