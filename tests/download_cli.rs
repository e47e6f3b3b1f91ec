//! `imglish download` through the real binary against a loopback HTTP server, then `imglish ingest` of its
//! output folder.

mod common;
#[path = "../download/tests/common/mod.rs"]
mod server;

use common::{imglish, text};

fn list(dir: &std::path::Path, s: &server::Server, paths: &[&str]) -> String {
    let mut t = String::from("url,caption,source\n");
    for (i, p) in paths.iter().enumerate() {
        t.push_str(&format!("{},picture number {i},web\n", s.url(p)));
    }
    let path = dir.join("urls.csv");
    std::fs::write(&path, t).expect("write list");
    path.display().to_string()
}

/// `imglish ingest --images IMAGES --out OUT`, which must succeed; its stdout.
fn ingest(images: &std::path::Path, out: &std::path::Path) -> String {
    let o = imglish(&[
        "ingest",
        "--images",
        images.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    text(&o.stdout)
}

#[test]
fn download_then_ingest_reads_the_shards_with_their_captions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = server::Server::start(server::demo_images(dir.path(), 8));
    let urls = list(
        dir.path(),
        &s,
        &["/img/0", "/img/1", "/404", "/img/2", "/html", "/img/3", "/noai/4"],
    );
    let out = dir.path().join("dl");
    let o = imglish(&[
        "download",
        "--urls",
        &urls,
        "--out",
        out.to_str().expect("utf8"),
        "--shard-size",
        "4",
        "--per-host",
        "2",
        "--retries",
        "0",
        "--user-agent-contact",
        "ops@example.invalid",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(
        stdout.starts_with("download: 7 listed, 4 stored, 3 failed (http-404: 1, not-an-image: 1, opt-out: 1)\n"),
        "{stdout}"
    );
    assert!(stdout.contains("2 of 2 shards written"), "{stdout}");

    let stdout = ingest(&out, &dir.path().join("manifest"));
    assert!(stdout.starts_with("ingest: 4 seen, 4 accepted"), "{stdout}");
    assert!(stdout.contains("\n  0 images without captions"), "{stdout}");

    // A plain folder of tar shards (img2dataset's layout: shards beside Parquet and JSON metadata, no
    // download.json) is read as its shards too.
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).expect("mkdir");
    for e in std::fs::read_dir(&out).expect("out") {
        let p = e.expect("entry").path();
        if p.file_name().is_some_and(|n| n != "download.json") {
            std::fs::copy(&p, plain.join(p.file_name().expect("name"))).expect("copy");
        }
    }
    let stdout = ingest(&plain, &dir.path().join("manifest2"));
    assert!(stdout.starts_with("ingest: 4 seen, 4 accepted"), "{stdout}");

    // A rerun fetches nothing.
    let before = s.total_requests();
    let o = imglish(&[
        "download",
        "--urls",
        &urls,
        "--out",
        out.to_str().expect("utf8"),
        "--shard-size",
        "4",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("this run: 0 fetched"), "{}", text(&o.stdout));
    assert_eq!(s.total_requests(), before);
}

#[test]
fn download_failures_are_one_line_with_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = server::Server::start(server::demo_images(dir.path(), 2));
    let urls = list(dir.path(), &s, &["/404", "/nowhere"]);
    let out = dir.path().join("dl");
    let o = imglish(&[
        "download",
        "--urls",
        &urls,
        "--out",
        out.to_str().expect("utf8"),
        "--retries",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(1));
    // (Off a terminal the phase's first progress line comes before it: the error is the one other line.)
    let err: String = text(&o.stderr)
        .lines()
        .filter(|l| !l.starts_with("progress: "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        err,
        format!(
            "error: download into {} failed: nothing downloaded: 2 URLs listed, 2 failed, most as http-404 (2); see {}\n",
            out.display(),
            out.join("status.parquet").display()
        )
    );

    let other = dir.path().join("links.csv");
    std::fs::write(&other, "link,text\nhttp://127.0.0.1:9/a.jpg,a\n").expect("write");
    let o = imglish(&[
        "download",
        "--urls",
        other.to_str().expect("utf8"),
        "--out",
        dir.path().join("dl2").to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        format!(
            "error: download into {} failed: {}: no URL column 'url' (columns: link, text); name it with --url-column\n",
            dir.path().join("dl2").display(),
            other.display()
        )
    );
}

#[test]
fn a_build_config_downloads_a_url_list_and_ingests_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = server::Server::start(server::demo_images(dir.path(), 12));
    let paths: Vec<String> = (0..12)
        .map(|i| format!("/img/{i}"))
        .chain(["/404".to_string()])
        .collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    list(dir.path(), &s, &paths);
    let config = "version = 1\n[download]\nurls = \"urls.csv\"\nretries = 0\nshard_size = 5\n\
                  [ingest]\nimages = [\"{out}/download\"]\nval_fraction = 0.25\n\
                  [tokenizer.fit]\npatch = 8\ninput_size = 32\ncodebook = 8\n[tokenize]\nviews = 1\n[pack]\n";
    std::fs::write(dir.path().join("c.toml"), config).expect("config");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_imglish"))
            .current_dir(dir.path())
            .args(["--threads", "2", "build", "c.toml", "--out", "b"])
            .output()
            .expect("run")
    };
    let o = run();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("b/download/download.json")).expect("record"))
            .expect("json");
    assert_eq!(
        (record["succeeded"].as_u64(), record["failed"].as_u64()),
        (Some(12), Some(1))
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("b/dataset/index.json")).expect("index")).expect("json");
    let counts = &index["counts"];
    assert_eq!(
        counts["train"].as_u64().unwrap_or(0) + counts["val"].as_u64().unwrap_or(0),
        12,
        "{index}"
    );
    let before = s.total_requests();
    let o = run();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("build: download up to date (skipped)"),
        "{}",
        text(&o.stdout)
    );
    assert_eq!(s.total_requests(), before);
}
