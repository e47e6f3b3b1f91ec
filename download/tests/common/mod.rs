//! A real HTTP/1.1 server on 127.0.0.1 for the download tests and benchmark: serves image files and injects
//! faults by path, counts requests per path and the most requests in flight at once per `Host`.
#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Default)]
struct State {
    requests: HashMap<String, u64>,
    in_flight: HashMap<String, u64>,
    max_in_flight: HashMap<String, u64>,
    user_agents: Vec<String>,
}

/// The server; stops when dropped.
pub struct Server {
    pub port: u16,
    images: Arc<Vec<(Vec<u8>, &'static str)>>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Serves `images` (bytes, content type) as `/img/N` (N modulo their count).
    pub fn start(images: Vec<(Vec<u8>, &'static str)>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("addr").port();
        let images = Arc::new(images);
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (images, state, stop) = (images.clone(), state.clone(), stop.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (images, state) = (images.clone(), state.clone());
                    thread::spawn(move || {
                        let _ = handle(conn, &images, &state);
                    });
                }
            });
        }
        Server {
            port,
            images,
            state,
            stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Requests received for `path`.
    pub fn requests(&self, path: &str) -> u64 {
        self.state
            .lock()
            .expect("state")
            .requests
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Requests received in all.
    pub fn total_requests(&self) -> u64 {
        self.state.lock().expect("state").requests.values().sum()
    }

    /// The most requests in flight at once to this server's 127.0.0.1 host.
    pub fn max_in_flight(&self) -> u64 {
        let host = format!("127.0.0.1:{}", self.port);
        self.state
            .lock()
            .expect("state")
            .max_in_flight
            .get(&host)
            .copied()
            .unwrap_or(0)
    }

    pub fn user_agents(&self) -> Vec<String> {
        self.state.lock().expect("state").user_agents.clone()
    }

    pub fn image(&self, n: usize) -> &[u8] {
        &self.images[n % self.images.len()].0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Real images to serve: the demo corpus's JPEG and PNG files that ingest accepts.
pub fn demo_images(dir: &Path, n: usize) -> Vec<(Vec<u8>, &'static str)> {
    let config = imglish_ingest::DemoConfig::default()
        .try_with_images(n.max(12))
        .expect("demo config");
    imglish_ingest::write_demo_corpus(&dir.join("demo"), &config, &|_| {}).expect("demo corpus");
    let mut out = Vec::new();
    let mut stack = vec![dir.join("demo/images")];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut seen = std::collections::HashSet::new();
    for p in files {
        let bytes = std::fs::read(&p).expect("read");
        let Ok(info) = imglish_ingest::validate_bytes(&bytes, &imglish_ingest::ValidationLimits::default()) else {
            continue;
        };
        // The demo corpus holds a byte-identical duplicate (one of its bad inputs): serve distinct images.
        if !seen.insert(info.content_hash) {
            continue;
        }
        let ct = if info.format == "png" {
            "image/png"
        } else {
            "image/jpeg"
        };
        out.push((bytes, ct));
        if out.len() == n {
            break;
        }
    }
    out
}

fn write_response(conn: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    conn.flush()
}

/// The status line and headers of a 200 response whose body the caller writes (or fails to write) itself.
fn write_image_head(conn: &mut TcpStream, content_type: &str, len: usize) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n\r\n"
    );
    conn.write_all(head.as_bytes())
}

fn handle(mut conn: TcpStream, images: &[(Vec<u8>, &'static str)], state: &Mutex<State>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut host = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("host") {
                host = v.trim().to_string();
            } else if k.eq_ignore_ascii_case("user-agent") {
                state.lock().expect("state").user_agents.push(v.trim().to_string());
            }
        }
    }
    let count = {
        let mut s = state.lock().expect("state");
        let n = s.requests.entry(path.clone()).or_insert(0);
        *n += 1;
        let count = *n;
        let f = s.in_flight.entry(host.clone()).or_insert(0);
        *f += 1;
        let now = *f;
        let m = s.max_in_flight.entry(host.clone()).or_insert(0);
        *m = (*m).max(now);
        count
    };
    // Counted as in flight until the response starts: the client may reuse its slot as soon as it has read it.
    let leave = || {
        let mut s = state.lock().expect("state");
        if let Some(f) = s.in_flight.get_mut(&host) {
            *f -= 1;
        }
    };
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let num = |i: usize| {
        segs.get(i)
            .and_then(|s| s.split('.').next())
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0)
    };
    let img = |n: usize| &images[n % images.len()];
    let ok = |conn: &mut TcpStream, n: usize, extra: &[(&str, String)]| {
        let (bytes, ct) = img(n);
        let mut headers = vec![("Content-Type", ct.to_string())];
        headers.extend(extra.iter().cloned());
        write_response(conn, "200 OK", &headers, bytes)
    };
    match segs[0] {
        "img" => {
            leave();
            ok(&mut conn, num(1), &[])
        }
        "delay" => {
            thread::sleep(Duration::from_millis(150));
            leave();
            ok(&mut conn, num(1), &[])
        }
        "404" => {
            leave();
            write_response(&mut conn, "404 Not Found", &[], b"not here")
        }
        // 500 on the first request for this path, then the image.
        "flaky" => {
            leave();
            if count == 1 {
                write_response(&mut conn, "500 Internal Server Error", &[], b"oops")
            } else {
                ok(&mut conn, num(1), &[])
            }
        }
        // 503 always.
        "down" => {
            leave();
            write_response(&mut conn, "503 Service Unavailable", &[], b"down")
        }
        // 429 with Retry-After: 1 on the first request, then the image.
        "busy" => {
            leave();
            if count == 1 {
                write_response(
                    &mut conn,
                    "429 Too Many Requests",
                    &[("Retry-After", "1".into())],
                    b"slow down",
                )
            } else {
                ok(&mut conn, num(1), &[])
            }
        }
        // Headers and half the body, then a stall longer than any test timeout.
        "slow" => {
            leave();
            let (bytes, ct) = img(num(1));
            write_image_head(&mut conn, ct, bytes.len())?;
            conn.write_all(&bytes[..bytes.len() / 2])?;
            conn.flush()?;
            thread::sleep(Duration::from_secs(5));
            conn.write_all(&bytes[bytes.len() / 2..])
        }
        // Content-Length of the whole image, a third of it sent, connection closed.
        "truncated" => {
            leave();
            let (bytes, ct) = img(num(1));
            write_image_head(&mut conn, ct, bytes.len())?;
            conn.write_all(&bytes[..bytes.len() / 3])?;
            conn.flush()?;
            conn.shutdown(std::net::Shutdown::Both)
        }
        "html" => {
            leave();
            write_response(
                &mut conn,
                "200 OK",
                &[("Content-Type", "text/html".into())],
                b"<!doctype html><html><body>Image not found</body></html>",
            )
        }
        // /redirect/N -> /redirect/N-1 -> ... -> /img/7
        "redirect" => {
            leave();
            let n = num(1);
            let to = if n == 0 {
                "/img/7".to_string()
            } else {
                format!("/redirect/{}", n - 1)
            };
            write_response(&mut conn, "302 Found", &[("Location", to)], b"")
        }
        "loop" => {
            leave();
            let to = if segs.get(1) == Some(&"a") {
                "/loop/b"
            } else {
                "/loop/a"
            };
            write_response(&mut conn, "301 Moved Permanently", &[("Location", to.to_string())], b"")
        }
        // 3 MB declared up front.
        "big" => {
            leave();
            let body = vec![0u8; 3 << 20];
            write_response(&mut conn, "200 OK", &[("Content-Type", "image/jpeg".into())], &body)
        }
        // 3 MB with no Content-Length (close-delimited): the limit has to be enforced while reading.
        "big-stream" => {
            leave();
            conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: image/jpeg\r\n\r\n")?;
            let chunk = vec![0xFFu8; 64 << 10];
            for _ in 0..48 {
                conn.write_all(&chunk)?;
            }
            conn.flush()
        }
        "noai" => {
            leave();
            ok(&mut conn, num(1), &[("X-Robots-Tag", "noai".into())])
        }
        "otherbot" => {
            leave();
            ok(&mut conn, num(1), &[("X-Robots-Tag", "otherbot: noai".into())])
        }
        // 404 until the path was asked for twice, then the image (for --retry-failed).
        "later" => {
            leave();
            if count <= 1 {
                write_response(&mut conn, "404 Not Found", &[], b"not yet")
            } else {
                ok(&mut conn, num(1), &[])
            }
        }
        _ => {
            leave();
            write_response(&mut conn, "404 Not Found", &[], b"unknown route")
        }
    }
}
