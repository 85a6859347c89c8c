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
        .on_thread_start(move || crate::threads::lower_priority(nice, "HTTP threads'"))
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
