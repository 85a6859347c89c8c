//! `xsrec serve`: the HTTP and gRPC service.
use crate::serve::{self, ServeConfig};

pub fn run(config: &ServeConfig) -> anyhow::Result<()> {
    let _log = serve::logs::init(config.log_format);
    tracing::info!("xsrec serve {config:#?}");
    if let Some(dir) = &config.data_dir {
        super::history::probe(dir)?;
    }
    let nice = config.http_thread_nice;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(move || lower_this_threads_priority(nice))
        .build()?;
    runtime.block_on(async {
        let server = serve::start(config.clone(), serve::shutdown_signal()).await?;
        tracing::info!(
            "listening on http://{} (ready once the model has warmed up)",
            server.addr
        );
        if let Some(grpc_addr) = server.grpc_addr {
            tracing::info!("grpc listening on {grpc_addr}");
        }
        if let Some(admin_addr) = server.admin_addr {
            tracing::info!("metrics and health on http://{admin_addr} (not on the API address)");
        }
        server.finished.await??;
        tracing::info!("shut down cleanly");
        Ok(())
    })
}

/// Under CPU contention the inference worker, which turns admitted requests into answers, must
/// win over the threads that accept, parse and reject new ones: with equal priority, clients
/// that retry at once on 429 take the CPU the worker needs and goodput collapses (measured in
/// docs/RELIABILITY.md). Only lowering is done, which needs no privilege; on Linux the nice
/// value is per thread.
fn lower_this_threads_priority(nice: i32) {
    if nice > 0 {
        // SAFETY: plain syscalls on the calling thread's own id.
        let status = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
        if status != 0 {
            tracing::warn!(
                "could not lower the HTTP threads' priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
