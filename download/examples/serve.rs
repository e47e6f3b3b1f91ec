//! The download tests' loopback HTTP server as a process, for `scripts/bench-download`: serves the demo
//! corpus's images as `/img/N` (plus the tests' fault routes) on 127.0.0.1 until stdin closes.
//!
//!   cargo run -p imglish-download --example serve -- WORK_DIR IMAGES
//!
//! Prints the port on stdout, then, when stdin closes, the requests served on stderr.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse::<usize>().ok())) else {
        eprintln!("usage: serve WORK_DIR IMAGES");
        std::process::exit(2);
    };
    let images = common::demo_images(std::path::Path::new(dir), n);
    let bytes: usize = images.iter().map(|(b, _)| b.len()).sum();
    let server = common::Server::start(images);
    println!("{}", server.port);
    eprintln!(
        "serve: {n} images, {:.1} MB, on 127.0.0.1:{}",
        bytes as f64 / 1e6,
        server.port
    );
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    eprintln!("serve: {} requests", server.total_requests());
}
