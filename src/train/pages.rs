//! How a training process treats the pages its allocator frees (jemalloc, which is also
//! libtorch's `malloc` in the `xsrec` binary: Cargo.toml).
//!
//! Training frees and reallocates the same tensors every batch, so it keeps freed pages rather
//! than fault them in again; but what it keeps is not reused evenly (batches differ in length,
//! and eight arenas each keep their own), so kept pages piled up: an ML-1M training's resident
//! memory rose from 1.6 GB to 18.4 GB over 31 epochs (about 550 MB an epoch), and handing the
//! kept pages back (`arena.<all>.purge`) took a 2.8 GB process to 0.83 GB. So each epoch ends by
//! handing them back: one epoch's faults, not one per batch.

/// Training frees and reallocates the same few hundred MB of tensors every batch (logits over the
/// catalogue and their gradients). jemalloc's defaults hand freed pages back to the kernel within
/// seconds, and at once for allocations past 8 MiB, so each batch faulted them in again and the
/// kernel zeroed them: 6.7 M page faults in 30 s, and an ML-1M epoch spent 80 s of its 185 s in
/// the kernel (1.9 s of 162 s with this; docs/BENCHMARKS.md). A process that trains keeps its
/// freed pages; serving keeps the defaults, which give memory back after users are erased.
/// [`return_freed_pages`] bounds what is kept.
pub fn keep_freed_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::CString;
        use std::ptr::null_mut;
        let never_decay = |name: &std::ffi::CStr| {
            let mut never: libc::ssize_t = -1;
            // SAFETY: every `*dirty_decay_ms` control takes an ssize_t, written from `never`,
            // which outlives the call; nothing is read back (null old pointers).
            unsafe {
                tikv_jemalloc_sys::mallctl(
                    name.as_ptr(),
                    null_mut(),
                    null_mut(),
                    (&raw mut never).cast(),
                    std::mem::size_of::<libc::ssize_t>(),
                )
            }
        };
        // The default of arenas made later (threads libtorch starts get theirs on first use).
        if never_decay(c"arenas.dirty_decay_ms") != 0 {
            eprintln!("warning: jemalloc refused arenas.dirty_decay_ms; training runs, but slower");
        }
        let mut narenas: libc::c_uint = 0;
        let mut size = std::mem::size_of::<libc::c_uint>();
        // SAFETY: `arenas.narenas` is an unsigned int read into `narenas`, `size` its length.
        let read = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"arenas.narenas".as_ptr(),
                (&raw mut narenas).cast(),
                &raw mut size,
                null_mut(),
                0,
            )
        };
        let existing = if read == 0 { narenas } else { 0 };
        // Arenas not made yet refuse (EFAULT) and will take the default set above.
        for arena in 0..existing {
            let name = CString::new(format!("arena.{arena}.dirty_decay_ms")).expect("no NUL");
            never_decay(&name);
        }
    }
}

/// Hands every page the allocator keeps freed back to the kernel (all arenas); a no-op where
/// jemalloc is not the allocator. Called between epochs.
pub fn return_freed_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `arena.<i>.purge` takes and returns nothing; 4096 is MALLCTL_ARENAS_ALL.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}
