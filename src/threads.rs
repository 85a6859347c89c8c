//! The server's own threads: their priorities, and what their panics say.
//!
//! Priorities: under CPU contention, the threads that finish admitted work
//! (the inference worker, the journal's writer) run at the default priority, and the threads
//! that accept new work or do background upkeep (HTTP, the journal's index steps) run lower, so
//! that they cannot take the CPU the first kind needs (measured in docs/RELIABILITY.md).

/// Lowers the calling thread's priority to `nice` (0..=19; 0 leaves it). Only lowering is done,
/// which needs no privilege; on Linux the nice value is per thread. A failure is logged: the
/// thread then runs at the default priority, which is correct, only less fair under load.
pub fn lower_priority(nice: i32, which: &str) {
    if nice > 0 {
        // SAFETY: plain syscalls on the calling thread's own id.
        let status = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
        if status != 0 {
            tracing::warn!(
                "could not lower the {which} priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// A caught panic's message, quoted (bounded and escaped like any text put into an error).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    crate::recommend::error::quote(text)
}
