//! One writer per output folder: a stage that writes a folder holds an advisory lock (`flock`) on the folder
//! itself while it runs. The OS releases it when the process ends, however it ends, so a `kill -9` never leaves a
//! stale lock, and nothing is written into the folder for it. A second writer fails at once, naming the holder.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context};

/// Held while a stage writes its folder.
#[derive(Debug)]
pub struct DirLock {
    _dir: File,
}

/// Creates `dir` if needed and locks it, or fails with "another imglish process (pid N) is writing DIR".
pub fn lock_dir(dir: &Path) -> anyhow::Result<DirLock> {
    take(dir, false)
}

/// As [`lock_dir`], for the workers of one run that write the folder side by side (`tokenize --worker I/N`): a
/// shared lock, which other workers share and a single writer of the folder (which takes it alone) is refused, in
/// either order.
pub fn share_dir(dir: &Path) -> anyhow::Result<DirLock> {
    take(dir, true)
}

fn take(dir: &Path, shared: bool) -> anyhow::Result<DirLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    let got = if shared {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match got {
        Ok(()) => Ok(DirLock { _dir: file }),
        Err(std::fs::TryLockError::WouldBlock) => {
            let who = match holder(&file) {
                Some(pid) => format!("another imglish process (pid {pid})"),
                None => "another imglish process".to_string(),
            };
            bail!("{who} is writing {}; wait for it to finish or stop it", dir.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", dir.display())),
    }
}

/// The pid holding a `flock` on `file`'s inode, from `/proc/locks` (Linux; `None` elsewhere).
fn holder(file: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let ino = file.metadata().ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 12345 fd:01:123456 0 EOF"
        let f: Vec<&str> = line.split_whitespace().collect();
        let inode: u64 = f.get(5)?.rsplit(':').next()?.parse().ok()?;
        (f.get(1) == Some(&"FLOCK") && inode == ino).then(|| f.get(4)?.parse().ok())?
    })
}
