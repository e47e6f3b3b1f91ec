//! The downloader against a real HTTP server on 127.0.0.1 with injected faults.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Server;
use imglish_download::{download, read_status, DownloadConfig, Error, StatusRow};

fn config(list: &Path) -> DownloadConfig {
    let mut c = DownloadConfig::new(list);
    c.shard_size = 8;
    c.fetch.concurrency = 16;
    c.fetch.per_host = 3;
    c.fetch.timeout = Duration::from_millis(1500);
    c.fetch.retries = 1;
    c.fetch.backoff = Duration::from_millis(50);
    c.fetch.max_bytes = 1 << 20;
    c.fetch.user_agent = imglish_download::user_agent(Some("tests@example.invalid"));
    c
}

fn write_list(path: &Path, server: &Server, paths: &[&str]) {
    let mut text = String::from("url\tcaption\tid\n");
    for (i, p) in paths.iter().enumerate() {
        text.push_str(&format!("{}\tcaption {i} for {p}\t{i}\n", server.url(p)));
    }
    std::fs::write(path, text).expect("write list");
}

fn by_url(rows: &[StatusRow], server: &Server) -> BTreeMap<String, StatusRow> {
    rows.iter()
        .map(|r| (r.url.trim_start_matches(&server.url("")).to_string(), r.clone()))
        .collect()
}

const FAULTS: [(&str, &str); 13] = [
    ("/404", "http-404"),
    ("/down", "http-503"),
    ("/slow/1", "timeout"),
    ("/truncated/2", "truncated"),
    ("/html", "not-an-image"),
    ("/loop/a", "redirect-loop"),
    ("/redirect/9", "too-many-redirects"),
    ("/big", "too-large"),
    ("/big-stream", "too-large"),
    ("/noai/3", "opt-out"),
    ("/later/4", "http-404"),
    ("/nowhere", "http-404"),
    ("/delay/5", ""),
];

#[test]
fn every_fault_ends_in_exactly_one_status_row_with_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(common::demo_images(dir.path(), 12));
    let mut paths: Vec<&str> = FAULTS.iter().map(|(p, _)| *p).collect();
    let good = ["/img/0", "/img/1", "/flaky/5", "/busy/6", "/redirect/3", "/otherbot/8"];
    paths.extend(good);
    let delays: Vec<String> = (0..12).map(|i| format!("/delay/{i}")).collect();
    paths.extend(delays.iter().map(String::as_str));
    let list = dir.path().join("urls.tsv");
    write_list(&list, &server, &paths);
    let out = dir.path().join("out");
    let started = Instant::now();
    let summary = download(&config(&list), &out, &|_| {}).expect("download");
    let rows = read_status(&out.join("status.parquet")).expect("status");

    // One row per listed URL, in list order; counts add up.
    assert_eq!(rows.len(), paths.len());
    assert!(rows.iter().enumerate().all(|(i, r)| r.index == i as u64));
    assert_eq!(summary.listed, paths.len() as u64);
    assert_eq!(summary.succeeded + summary.failed, summary.listed);
    let rows = by_url(&rows, &server);
    for (path, reason) in FAULTS.iter().filter(|(_, r)| !r.is_empty()) {
        let row = &rows[*path];
        assert_eq!(row.status, "failed", "{path}: {row:?}");
        assert_eq!(row.reason.as_deref(), Some(*reason), "{path}: {row:?}");
    }
    for path in good.iter().copied().chain(delays.iter().map(String::as_str)) {
        assert!(rows[path].ok(), "{path}: {:?}", rows[path]);
    }
    // Retried only what may pass: 404 and opt-outs once; 500 / 429 / 503 / timeouts twice.
    assert_eq!(server.requests("/404"), 1);
    assert_eq!(server.requests("/noai/3"), 1);
    assert_eq!(server.requests("/html"), 1);
    assert_eq!(server.requests("/flaky/5"), 2);
    assert_eq!(server.requests("/down"), 2);
    assert_eq!(server.requests("/slow/1"), 2);
    assert_eq!(rows["/flaky/5"].attempts, 2);
    assert_eq!(rows["/busy/6"].attempts, 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
    assert_eq!(
        rows["/redirect/3"].final_url.as_deref(),
        Some(server.url("/img/7").as_str())
    );
    assert_eq!(rows["/redirect/3"].sha256.as_deref().map(str::len), Some(64));
    assert_eq!(rows["/noai/3"].error.as_deref(), Some("X-Robots-Tag: noai"));
    // The per-host limit held (the server counts requests in flight).
    assert!(server.max_in_flight() <= 3, "max in flight {}", server.max_in_flight());
    assert!(server.max_in_flight() >= 2, "requests ran concurrently");
    assert!(server
        .user_agents()
        .iter()
        .all(|ua| ua.starts_with("imglish/") && ua.contains("tests@example.invalid")));

    // The tar shards hold exactly the successes: image, caption, metadata per key.
    let mut members = Vec::new();
    for e in std::fs::read_dir(&out).expect("out") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "tar") {
            let mut a = tar::Archive::new(std::fs::File::open(&p).expect("tar"));
            for m in a.entries().expect("entries") {
                members.push(m.expect("member").path().expect("path").to_string_lossy().into_owned());
            }
        }
    }
    assert_eq!(members.len() as u64, 3 * summary.succeeded);
    let key = &rows["/img/1"].key;
    assert!(members.contains(&format!("{key}.txt")) && members.contains(&format!("{key}.json")));
}

#[test]
fn a_rerun_fetches_nothing_and_retry_failed_fetches_only_the_failed_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(common::demo_images(dir.path(), 6));
    let paths = ["/img/0", "/later/1", "/img/2", "/404", "/img/3", "/later/4", "/img/5"];
    let list = dir.path().join("urls.tsv");
    write_list(&list, &server, &paths);
    let out = dir.path().join("out");
    let mut c = config(&list);
    c.shard_size = 3;
    let first = download(&c, &out, &|_| {}).expect("first run");
    assert_eq!((first.succeeded, first.failed, first.shards), (4, 3, 3));
    let snapshot = |name: &str| std::fs::read(out.join(name)).expect("read");
    let tars: Vec<Vec<u8>> = (0..3).map(|i| snapshot(&format!("shard-{i:05}.tar"))).collect();
    let requests = server.total_requests();

    let again = download(&c, &out, &|_| {}).expect("rerun");
    assert_eq!(
        server.total_requests(),
        requests,
        "finished shards are not fetched again"
    );
    assert_eq!((again.fetched_this_run, again.shards_written), (0, 0));
    assert_eq!((again.succeeded, again.failed), (4, 3));
    for (i, t) in tars.iter().enumerate() {
        assert_eq!(&snapshot(&format!("shard-{i:05}.tar")), t);
    }

    c.retry_failed = true;
    let retried = download(&c, &out, &|_| {}).expect("retry failed");
    assert_eq!(server.total_requests(), requests + 3, "only the three failed rows");
    assert_eq!(retried.fetched_this_run, 3);
    assert_eq!((retried.succeeded, retried.failed), (6, 1));
    let rows = read_status(&out.join("status.parquet")).expect("status");
    assert_eq!(rows.iter().filter(|r| r.ok()).count(), 6);
    assert_eq!(rows[3].reason.as_deref(), Some("http-404"));
    // Shard 0 now holds /img/0, /later/1 (added) and /img/2, in key order.
    let mut a = tar::Archive::new(std::fs::File::open(out.join("shard-00000.tar")).expect("tar"));
    let names: Vec<String> = a
        .entries()
        .expect("entries")
        .map(|m| m.expect("member").path().expect("path").to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".txt") && !n.ends_with(".json"))
        .collect();
    let keys: Vec<&str> = names.iter().map(|n| n.split('.').next().unwrap_or_default()).collect();
    assert_eq!(keys, ["000000000", "000000001", "000000002"]);
}

#[test]
fn another_list_in_the_same_folder_is_refused_naming_what_differs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(common::demo_images(dir.path(), 2));
    let list = dir.path().join("urls.tsv");
    write_list(&list, &server, &["/img/0"]);
    let out = dir.path().join("out");
    download(&config(&list), &out, &|_| {}).expect("first");
    let mut c = config(&list);
    c.shard_size = 5;
    let err = download(&c, &out, &|_| {}).expect_err("other settings");
    assert_eq!(
        err.to_string(),
        format!(
            "{} holds a download of {} (shard_size differs: 8 there, 5 now); use another --out, or --overwrite to start it again",
            out.display(),
            list.display()
        )
    );
    c.overwrite = true;
    download(&c, &out, &|_| {}).expect("overwrite");
}

#[test]
fn a_run_that_stores_nothing_fails_naming_the_top_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(common::demo_images(dir.path(), 2));
    let list = dir.path().join("urls.tsv");
    write_list(&list, &server, &["/404", "/html", "/nowhere"]);
    let out = dir.path().join("out");
    let err = download(&config(&list), &out, &|_| {}).expect_err("nothing stored");
    assert!(matches!(
        err,
        Error::NothingDownloaded {
            listed: 3,
            failed: 3,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        format!(
            "nothing downloaded: 3 URLs listed, 3 failed, most as http-404 (2); see {}",
            out.join("status.parquet").display()
        )
    );
    let mut c = config(&list);
    c.allow_empty = true;
    let s = download(&c, &out, &|_| {}).expect("allowed");
    assert_eq!(s.succeeded, 0);
}

#[test]
fn opt_outs_can_be_ignored_and_that_is_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(common::demo_images(dir.path(), 2));
    let list = dir.path().join("urls.tsv");
    write_list(&list, &server, &["/noai/0", "/img/1"]);
    let out = dir.path().join("out");
    let mut c = config(&list);
    c.fetch.honour_opt_out = false;
    let s = download(&c, &out, &|_| {}).expect("download");
    assert_eq!(s.succeeded, 2);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("download.json")).expect("download.json")).expect("json");
    assert_eq!(record["honour_opt_out"], serde_json::Value::Bool(false));
}

#[test]
fn the_per_host_rate_spaces_request_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(common::demo_images(dir.path(), 4));
    let paths: Vec<String> = (0..10).map(|i| format!("/img/{i}")).collect();
    let list = dir.path().join("urls.tsv");
    write_list(&list, &server, &paths.iter().map(String::as_str).collect::<Vec<_>>());
    let mut c = config(&list);
    c.fetch.per_host_rate = 20.0;
    let started = Instant::now();
    let s = download(&c, &dir.path().join("out"), &|_| {}).expect("download");
    assert_eq!(s.succeeded, 10);
    // Ten starts 50 ms apart: the last one 450 ms after the first.
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
}
