//! The process-wide ONNX Runtime environment.
//!
//! imglish links ONNX Runtime dynamically (`ort` with `load-dynamic`): the shared library is located at run time,
//! loaded once, and one environment is shared by every session of the process (ONNX Runtime allows only one).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

/// The loaded ONNX Runtime library and its environment.
pub struct Runtime {
    env: ort::environment::Environment,
    library: PathBuf,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("library", &self.library)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// The shared library that was loaded.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// ONNX Runtime's own build description (version, commit, flags).
    pub fn build_info(&self) -> &'static str {
        ort::info()
    }

    pub(crate) fn environment(&self) -> &ort::environment::Environment {
        &self.env
    }
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

/// The folder `scripts/setup-onnxruntime` installs into, for a build from this source tree.
fn repo_install_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(".imglish")
        .join("onnxruntime")
}

const LIB_NAME: &str = "libonnxruntime.so";

/// The machine-wide copy `scripts/setup-onnxruntime` also keeps (`$IMGLISH_CACHE`, default
/// `~/.cache/imglish`): found even when the source tree this binary was built from has moved or gone (builds
/// share a target directory across clones).
fn cache_install_dir() -> Option<PathBuf> {
    std::env::var_os("IMGLISH_CACHE")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("imglish")))
        .map(|c| c.join("onnxruntime"))
}

/// Where the library is looked for, in order: `$ORT_DYLIB_PATH`; `libonnxruntime.so` next to the executable;
/// the folder written by `scripts/setup-onnxruntime` in the source tree, then its machine-wide copy (the GPU
/// build first when compiled with `cuda`).
/// Returns the first that exists, or the last candidate when none does.
pub fn library_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join(LIB_NAME));
    }
    let repo = repo_install_dir();
    let dirs = std::iter::once(repo.clone()).chain(cache_install_dir());
    for dir in dirs {
        if cfg!(feature = "cuda") {
            candidates.push(dir.join("gpu").join(LIB_NAME));
        }
        candidates.push(dir.join("cpu").join(LIB_NAME));
    }
    // Name the source tree's folder when nothing exists (what the setup script writes first).
    let fallback = repo.join("cpu").join(LIB_NAME);
    candidates.into_iter().find(|c| c.exists()).unwrap_or(fallback)
}

/// The shared runtime, loading the library and creating the environment on first use.
///
/// A missing library is [`Error::RuntimeMissing`], never a `dlopen` panic.
pub fn runtime() -> Result<&'static Runtime> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let _guard = INIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let library = library_path();
    if !library.is_file() {
        return Err(Error::RuntimeMissing { path: library });
    }
    let library = library.canonicalize().map_err(|source| Error::Io {
        path: library.clone(),
        source,
    })?;
    let load_err = |reason: String| Error::RuntimeLoad {
        path: library.clone(),
        reason,
    };
    let env = ort::init_from(&library)
        .map_err(|e| load_err(e.to_string()))?
        .with_name("imglish")
        .with_telemetry(false)
        .build()
        .map_err(|e| load_err(e.to_string()))?;
    tracing::debug!(library = %library.display(), "ONNX Runtime loaded");
    Ok(RUNTIME.get_or_init(|| Runtime { env, library }))
}
