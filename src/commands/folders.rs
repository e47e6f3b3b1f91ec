//! What kind of imglish folder a path is, so that a stage pointed at the wrong one says which stage made what
//! it got and which it wants, instead of reporting a missing JSON file.

use std::path::Path;

/// The folders the stages write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folder {
    /// `imglish ingest --out`: ingest.json, samples.parquet.
    Manifest,
    /// `imglish tokenize --out`: tokenize.json, part files.
    Tokens,
    /// `imglish pack --out`: index.json, shards.
    Dataset,
    /// `imglish train --out`: config.json, checkpoints/.
    Run,
}

impl Folder {
    fn what(self) -> &'static str {
        match self {
            Folder::Manifest => "a manifest directory (the output of `imglish ingest`)",
            Folder::Tokens => "a token directory (the output of `imglish tokenize`)",
            Folder::Dataset => "a dataset directory (the output of `imglish pack`)",
            Folder::Run => "a training run directory (the output of `imglish train`)",
        }
    }

    fn holds(self, dir: &Path) -> bool {
        match self {
            Folder::Manifest => dir.join("ingest.json").is_file(),
            Folder::Tokens => {
                dir.join("tokenize.json").is_file()
                    || std::fs::read_dir(dir).is_ok_and(|entries| {
                        entries.filter_map(|e| e.ok()).any(|e| {
                            let name = e.file_name();
                            let name = name.to_string_lossy();
                            name.starts_with("part-") && name.ends_with(".done.json")
                        })
                    })
            }
            Folder::Dataset => dir.join("index.json").is_file(),
            Folder::Run => dir.join("config.json").is_file() && dir.join("checkpoints").is_dir(),
        }
    }

    /// What `dir` holds, if it is one of the stages' folders.
    fn of(dir: &Path) -> Option<Folder> {
        [Folder::Manifest, Folder::Tokens, Folder::Dataset, Folder::Run]
            .into_iter()
            .find(|f| f.holds(dir))
    }
}

/// Refuses `dir` given as `flag` when it is another stage's folder, naming what it is and what `flag` wants.
/// A folder of none of these kinds is left to the stage (which reports what is missing).
pub fn expect(dir: &Path, want: Folder, flag: &str) -> anyhow::Result<()> {
    if want == Folder::Dataset && imglish_pack::remote_url(dir).is_some() {
        // Read from object storage: checked when its index.json is fetched.
        return Ok(());
    }
    if want.holds(dir) {
        return Ok(());
    }
    if !dir.exists() {
        anyhow::bail!(
            "{flag} {}: no such directory; {flag} wants {}",
            dir.display(),
            want.what()
        );
    }
    match Folder::of(dir) {
        Some(other) => anyhow::bail!(
            "{} looks like {}; {flag} wants {}",
            dir.display(),
            other.what(),
            want.what()
        ),
        None => Ok(()),
    }
}
