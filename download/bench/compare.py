"""scripts/bench-download's driver (stdlib only): starts the loopback server, writes the URL list, runs
`imglish download` and img2dataset alternately on it and prints the table."""
import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import tarfile
import time

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tiff")


def stored(folder):
    """(images, image bytes) in the tar shards of `folder`."""
    n = size = 0
    for path in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        with tarfile.open(path) as t:
            for m in t.getmembers():
                if m.name.lower().endswith(IMAGE_EXTS):
                    n += 1
                    size += m.size
    return n, size


def run(cmd, log):
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    for a in ("--imglish", "--serve", "--img2dataset", "--work"):
        ap.add_argument(a, required=True)
    ap.add_argument("--urls", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=200)
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    server = subprocess.Popen([a.serve, os.path.join(a.work, "server"), str(a.images)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(server.stdout.readline())
    urls = os.path.join(a.work, "urls.csv")
    missing = 0
    with open(urls, "w") as f:
        f.write("url,caption\n")
        for i in range(a.urls):
            if i % 20 == 19:
                path, missing = f"/404/{i}", missing + 1
            else:
                path = f"/img/{i}"
            f.write(f"http://127.0.0.1:{port}{path},picture {i}\n")
    results = {"imglish": [], "img2dataset": []}
    try:
        for r in range(a.rounds):
            out = os.path.join(a.work, f"imglish-{r}")
            secs = run([a.imglish, "--quiet", "--threads", "2", "download", "--urls", urls, "--out", out,
                        "--concurrency", str(a.concurrency), "--per-host", str(a.concurrency), "--retries", "0",
                        "--shard-size", "1000", "--allow-empty"], out + ".log")
            results["imglish"].append((secs, *stored(out)))
            out = os.path.join(a.work, f"img2dataset-{r}")
            secs = run([a.img2dataset, "--url_list", urls, "--input_format", "csv", "--url_col", "url",
                        "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", out,
                        "--processes_count", "2", "--thread_count", str(a.concurrency // 2),
                        "--resize_mode", "no", "--disable_all_reencoding", "True", "--retries", "0",
                        "--number_sample_per_shard", "1000", "--timeout", "10", "--enable_wandb", "False"],
                       out + ".log")
            results["img2dataset"].append((secs, *stored(out)))
    finally:
        server.stdin.close()
        server.wait()
    print(f"Download benchmark: {a.urls} URLs ({missing} answer 404) from a loopback server, "
          f"{a.images} distinct demo images, concurrency {a.concurrency}, no retries, {a.rounds} rounds")
    print(f"| {'tool':<12} | {'round':>5} | {'seconds':>8} | {'images/s':>9} | {'MB/s':>7} | {'stored':>6} | {'failed':>6} |")
    print(f"|{'-' * 14}|{'-' * 7}|{'-' * 10}|{'-' * 11}|{'-' * 9}|{'-' * 8}|{'-' * 8}|")
    med = {}
    for tool, rows in results.items():
        for r, (secs, n, size) in enumerate(rows):
            print(f"| {tool:<12} | {r:>5} | {secs:>8.2f} | {n / secs:>9.1f} | {size / 1e6 / secs:>7.2f} | {n:>6} | "
                  f"{a.urls - n:>6} |")
        med[tool] = statistics.median(n / secs for secs, n, _ in rows)
    print(f"imglish vs img2dataset (median images/s): {med['imglish'] / med['img2dataset']:.2f}x")
    json.dump(results, open(os.path.join(a.work, "results.json"), "w"))


if __name__ == "__main__":
    main()
