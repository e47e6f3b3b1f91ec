//! How a long stage reports what it is doing: named phases with their totals, and items done.

/// Progress of a long stage. A closure `Fn(u64)` is one (it gets the items done and ignores phases); the
/// `imglish` binary draws bars from it, or writes a periodic line when stderr is not a terminal.
pub trait Progress {
    /// `n` more items of the current phase are done.
    fn inc(&self, n: u64);

    /// A new phase starts: its name and how many items it has (0: not known in advance); the count restarts.
    fn phase(&self, name: &str, total: u64) {
        let _ = (name, total);
    }

    /// A short status of the current phase (for example counts by outcome), shown beside the count.
    fn message(&self, text: &str) {
        let _ = text;
    }
}

impl<F: Fn(u64)> Progress for F {
    fn inc(&self, n: u64) {
        self(n)
    }
}
