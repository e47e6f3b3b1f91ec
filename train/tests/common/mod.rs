//! Helpers shared by the PyTorch reference tests: where the repository is, the torch venv's python, and the
//! largest difference of two tensors.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use tch::Tensor;

/// This package's directory. Cargo sets `CARGO_MANIFEST_DIR` when it runs a test, which stays right when the
/// (shared) target directory holds a binary compiled from another clone of the repository; the compile-time
/// value is the fallback for running the binary by hand.
pub fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn repo() -> PathBuf {
    manifest_dir().join("..")
}

/// The python of the torch venv (`scripts/setup-libtorch` installs it; `scripts/test` runs that first).
pub fn python() -> PathBuf {
    let out = Command::new(repo().join("scripts/setup-libtorch"))
        .arg("--python")
        .output()
        .expect("scripts/setup-libtorch --python");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup-libtorch (the PyTorch reference needs torch==2.13.0)",
        path.display()
    );
    path
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}
