//! The process's allocator settings for training: glibc's malloc returns every freed block above its mmap
//! threshold (at most 32 MiB) to the kernel and trims the heap top, so a model whose activations are tens of MiB
//! (the dVAE at batch 16: 38 MiB per feature map) maps, faults in and zeroes its activation memory again on every
//! step. Keeping freed memory in the heap instead made `tokenizer train-dvae` ~25% faster on this 2-core machine
//! (docs/performance.md) for ~20% more peak memory.

/// Serves every allocation from the heap and never trims it (glibc `M_MMAP_MAX = 0`, `M_TRIM_THRESHOLD` at its
/// maximum), unless the environment already chose (`GLIBC_TUNABLES`, `MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`).
/// Returns whether the settings were applied (never on other C libraries).
pub fn reuse_freed_memory() -> bool {
    !environment_chose() && glibc::keep_freed_memory()
}

/// Whether the environment sets glibc's malloc itself.
fn environment_chose() -> bool {
    ["GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod glibc {
    use std::os::raw::c_int;

    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_MAX: c_int = -4;

    unsafe extern "C" {
        // glibc's `int mallopt(int param, int value)`: sets one malloc parameter under the allocator's own lock,
        // returns 1 on success; no pointers, any value is accepted or refused with 0.
        safe fn mallopt(param: c_int, value: c_int) -> c_int;
    }

    pub(super) fn keep_freed_memory() -> bool {
        mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, c_int::MAX) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod glibc {
    pub(super) fn keep_freed_memory() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings_unless_the_environment_chose() {
        assert_eq!(super::reuse_freed_memory(), !super::environment_chose());
        // What the process then does: a large block freed and allocated again still works.
        let v = vec![1u8; 64 << 20];
        drop(v);
        let w = vec![2u8; 64 << 20];
        assert_eq!(w[(64 << 20) - 1], 2);
    }
}
