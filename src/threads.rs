//! The server's own threads: their priorities, and what their panics say.
//!
//! Priorities: under CPU contention, the threads that finish admitted work
//! (the inference worker, the journal's writer) run at the default priority, and the threads
//! that accept new work or do background upkeep (HTTP, the journal's index steps) run lower, so
//! that they cannot take the CPU the first kind needs (measured in docs/RELIABILITY.md). The
//! journal's writer also waits for the core instead of taking it when it wakes (`SCHED_BATCH`),
//! so that its work comes in groups.

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

/// Puts the calling thread under `SCHED_BATCH` (its nice value stays): it no longer preempts the
/// running thread when it wakes, but runs when that one blocks or its time slice ends. For the
/// journal's writer, which every acknowledged call wakes: at its default priority it took the
/// core from the handler at each wake-up and committed that one call alone (45,586 sleeps for
/// 45,259 calls); batched, it finds the calls that arrived meanwhile and commits them together
/// (docs/RELIABILITY.md, "The writer's wake-ups"). Needs no privilege; a failure is logged and
/// leaves the default policy, which is correct, only slower.
pub fn batch_scheduling(which: &str) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on the calling thread.
    let status = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if status != 0 {
        tracing::warn!(
            "could not set the {which} scheduling: {}",
            std::io::Error::last_os_error()
        );
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
