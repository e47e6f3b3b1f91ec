//! Records libtorch's `lib/` as the run path of this crate's tests and examples, so that `cargo test` finds
//! libtorch without LD_LIBRARY_PATH (torch-sys passes the directory it linked against as
//! `DEP_TCH_LIBTORCH_LIB`).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        // The resolved path (the venv under ~/.cache/imglish, not the clone's `.imglish/libtorch` link), so the
        // binary keeps working when the clone it was built from moves or goes (the target dir is shared).
        let lib = std::fs::canonicalize(&lib).map_or(lib, |p| p.display().to_string());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
