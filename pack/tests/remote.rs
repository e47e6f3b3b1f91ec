//! A dataset read from a URL (a static file server on 127.0.0.1 started by the test): the stream delivers what
//! the local copy delivers; shards ahead of the reader are prefetched into the cache before the stream reaches
//! them; a shard changed on the server after packing is refused with its name.
//!
//! One test per binary: the remote options are process-wide (the first set wins).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{info, write_parts};
use imglish_pack::*;

/// Serves the files under `root` over HTTP/1.1 GET (`Connection: close`), recording each path asked for, and
/// the bytes of files named in `replace` instead of the files'.
struct Server {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
    replace: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

fn serve(root: PathBuf) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let replace: Arc<Mutex<BTreeMap<String, Vec<u8>>>> = Arc::new(Mutex::new(BTreeMap::new()));
    let (log, swap) = (requests.clone(), replace.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (root, log, swap) = (root.clone(), log.clone(), swap.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    return;
                }
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
                log.lock().expect("log").push(path.clone());
                let name = path.trim_start_matches('/').to_string();
                let body = swap
                    .lock()
                    .expect("swap")
                    .get(name.rsplit('/').next().unwrap_or(""))
                    .cloned()
                    .or_else(|| std::fs::read(root.join(&name)).ok());
                let mut out = stream;
                let _ = match body {
                    Some(b) => out
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                b.len()
                            )
                            .as_bytes(),
                        )
                        .and_then(|()| out.write_all(&b)),
                    None => out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
                };
            });
        }
    });
    Server { url, requests, replace }
}

fn dataset(dir: &Path, n: u64) -> PathBuf {
    let info = info(2, [2, 4], 256);
    write_parts(&dir.join("tokens"), &info, &(0..n).collect::<Vec<_>>(), 97, false);
    let cfg = PackConfig {
        target_shard_bytes: 12_000,
        batch_rows: 16,
        zstd_level: 1,
        shuffle_seed: None,
        include_pixels: false,
    };
    let out = dir.join("ds");
    pack_dataset(&dir.join("tokens"), None, &out, &cfg, &|_| {}).expect("pack");
    out
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_url_streams_like_the_local_copy_with_prefetch_and_checked_shards() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let local = dataset(tmp.path(), 800);
    let server = serve(tmp.path().to_path_buf());
    let cache = tmp.path().join("cache");
    set_remote_options(RemoteOptions {
        cache_dir: cache.clone(),
        cache_limit: 1 << 30,
        prefetch: 2,
    });
    let url = format!("{}/ds", server.url);
    let remote = Dataset::open(&url).expect("open the URL");
    let local_ds = Dataset::open(&local).expect("open");
    let shards = local_ds.shards().to_vec();
    assert!(shards.len() >= 5, "{} shards", shards.len());
    // The stream below runs at most a few chunks of 8 ahead of the reader: all within shard 0.
    assert!(shards[0].rows >= 40, "{} rows in shard 0", shards[0].rows);
    assert_eq!(remote.index(), local_ds.index());
    let dir = remote.cache_dir().expect("a remote dataset has a cache").to_path_buf();
    assert!(dir.starts_with(&cache));
    assert_eq!(
        std::fs::read_dir(&dir).expect("cache").count(),
        0,
        "nothing fetched at open"
    );

    // In dataset order, one worker, a chunk at a time: after the first sample, the next two shards are fetched
    // ahead of the reader.
    let options = StreamOptions {
        shuffle: Shuffle::None,
        chunk_samples: 8,
        prefetch_chunks: 1,
        ..StreamOptions::default()
    };
    let mut stream = remote.stream(&options, StreamState::default()).expect("stream");
    let first = stream.next().expect("a sample").expect("read");
    assert_eq!(first.sample_id, local_ds.get(0).expect("first").sample_id);
    let cached = |name: &str| dir.join(name).exists();
    wait_for("prefetched shards", || {
        cached(&shards[1].file) && cached(&shards[2].file)
    });
    let asked = |name: &str| {
        server
            .requests
            .lock()
            .expect("log")
            .iter()
            .filter(|p| p.ends_with(name))
            .count()
    };
    assert!(!cached(&shards[4].file), "only --prefetch-shards ahead");
    // The rest of the epoch equals the local copy's, and no shard is fetched twice.
    let mut got = vec![first];
    got.extend(stream.map(|s| s.expect("sample")));
    let want: Vec<Sample> = local_ds
        .stream(&options, StreamState::default())
        .expect("stream")
        .map(|s| s.expect("sample"))
        .collect();
    assert_eq!(got, want);
    for s in &shards {
        // The stream reads the train split; every train shard is fetched exactly once, and nothing else.
        let want = usize::from(s.split == Split::Train);
        assert_eq!(asked(&s.file), want, "{} fetched {want} times", s.file);
    }

    // A shard changed on the server after packing: refused with its name, never read.
    let bad = &shards[3];
    let mut bytes = std::fs::read(local.join(&bad.file)).expect("shard");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    server.replace.lock().expect("swap").insert(bad.file.clone(), bytes);
    // Opened again in this process: the same cache (another process would get a folder of its own).
    let again = Dataset::open(&url).expect("open");
    assert_eq!(again.cache_dir(), Some(dir.as_path()));
    let report = again.verify();
    assert_eq!(report.bad.len(), 1, "{report:?}");
    assert_eq!(report.bad[0].0, bad.file);
    assert!(
        report.bad[0].1.contains("(changed or damaged after packing)"),
        "{}",
        report.bad[0].1
    );
    assert!(
        !dir.join(&bad.file).exists(),
        "a refused download leaves nothing in the cache"
    );
}
