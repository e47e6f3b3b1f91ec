//! Records libtorch's `lib/` as the run path of this crate's tests and examples, so that `cargo test` finds
//! libtorch without LD_LIBRARY_PATH (torch-sys passes the directory it linked against as
//! `DEP_TCH_LIBTORCH_LIB`).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
