//! `xsrec serve`: the HTTP service.
use crate::serve::{self, ServeConfig};

pub fn run(config: &ServeConfig) -> anyhow::Result<()> {
    eprintln!("xsrec serve {config:#?}");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let server = serve::start(config.clone(), serve::shutdown_signal()).await?;
        eprintln!(
            "listening on http://{} (ready once the model has warmed up)",
            server.addr
        );
        server.finished.await??;
        eprintln!("shut down cleanly");
        Ok(())
    })
}
