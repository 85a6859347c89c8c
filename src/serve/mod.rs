//! The service: configuration, start-up (load, warm up, bind), and graceful shutdown.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::{self, AppState, Catalog, Limits};
use crate::data::formats::load_item_meta;
use crate::history::HistoryStore;
use crate::infer::{worker::category_names, Engine, EngineConfig, WorkerConfig};
use crate::metrics::Metrics;
use crate::model::{Artifact, Precision};

/// `xsrec serve` settings; every flag can also come from its `XSREC_*` environment variable.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Model artifact directory.
    #[arg(long, env = "XSREC_MODEL", default_value = "models/default")]
    pub model: PathBuf,
    #[arg(long, env = "XSREC_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "XSREC_DEVICE", default_value = "auto")]
    pub device: String,
    /// Inference arithmetic: fp32, or bf16 (half the memory traffic; meant for GPUs).
    #[arg(long, env = "XSREC_PRECISION", value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Item categories for /v1/interests (RecBole `.item` or TSV), replacing the artifact's.
    #[arg(long, env = "XSREC_ITEM_META")]
    pub item_meta: Option<PathBuf>,
    /// Events kept per user; defaults to the model's max_len.
    #[arg(long, env = "XSREC_HISTORY_CAP")]
    pub history_cap: Option<usize>,
    #[arg(long, env = "XSREC_HISTORY_SHARDS", default_value_t = 64)]
    pub history_shards: usize,
    #[arg(long, env = "XSREC_MAX_BATCH_SIZE", default_value_t = 64)]
    pub max_batch_size: usize,
    /// How long the oldest request may wait for more to join it while the worker is idle. 0 (the
    /// default) sends an idle worker whatever is there; batches still grow while it is busy,
    /// which is where they pay off (docs/BENCHMARKS.md, batcher A/B).
    #[arg(long, env = "XSREC_MAX_BATCH_DELAY_US", default_value_t = 0)]
    pub max_batch_delay_us: u64,
    #[arg(long, env = "XSREC_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,
    #[arg(long, env = "XSREC_REQUEST_TIMEOUT_MS", default_value_t = 2000)]
    pub request_timeout_ms: u64,
    #[arg(long, env = "XSREC_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    #[arg(long, env = "XSREC_MAX_EVENTS_PER_CALL", default_value_t = 1000)]
    pub max_events_per_call: usize,
    #[arg(long, env = "XSREC_MAX_CANDIDATES", default_value_t = 10_000)]
    pub max_candidates: usize,
    #[arg(long, env = "XSREC_MAX_BATCH_REQUESTS", default_value_t = 256)]
    pub max_batch_requests: usize,
    /// Users whose final hidden state the inference worker keeps.
    #[arg(long, env = "XSREC_CACHE_CAPACITY", default_value_t = 100_000)]
    pub cache_capacity: usize,
    /// libtorch intra-op threads. One is fastest on CPU here: the inference worker already runs
    /// beside the HTTP threads, and waking a second math thread for small batches costs more
    /// than it saves (measured in docs/BENCHMARKS.md).
    #[arg(long, env = "XSREC_TORCH_THREADS", default_value_t = 1)]
    pub torch_threads: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[arg(long, env = "XSREC_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
}

/// A 64-bit FNV-1a of the weights: the same bytes give the same version on every machine.
fn weights_version(dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join(crate::model::artifact::WEIGHTS_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let hash = bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    Ok(format!("{hash:016x}"))
}

fn catalog(artifact: &Artifact) -> Catalog {
    let item_ids: Vec<Arc<str>> = std::iter::once("")
        .chain(artifact.items.ids().iter().map(String::as_str))
        .map(Arc::from)
        .collect();
    let mut popular: Vec<u32> = (1..artifact.items.len() as u32).collect();
    popular.sort_by(|&a, &b| {
        artifact.item_counts[b as usize]
            .cmp(&artifact.item_counts[a as usize])
            .then(a.cmp(&b))
    });
    let categories = category_names(&artifact.item_categories);
    let total: u64 = artifact.item_counts.iter().sum();
    let mut mass = vec![0f32; categories.len()];
    for (item, item_categories) in artifact.item_categories.iter().enumerate() {
        for category in item_categories {
            let c = categories.binary_search(category).expect("listed");
            mass[c] += artifact.item_counts[item] as f32 / total.max(1) as f32 / item_categories.len() as f32;
        }
    }
    let mut popular_interests: Vec<(usize, f32)> = mass.into_iter().enumerate().collect();
    popular_interests.sort_by(|a, b| b.1.total_cmp(&a.1));
    Catalog {
        items: artifact.items.clone(),
        item_ids,
        event_types: artifact.event_types.clone(),
        popular,
        item_counts: artifact.item_counts.clone(),
        categories,
        popular_interests,
    }
}

/// A started server: its address, and the task that ends when it has shut down.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    pub finished: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Loads the model, starts the engine and begins serving; readiness flips once warm-up is done.
/// The server stops when `shutdown` completes, letting in-flight requests finish.
pub async fn start(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningServer> {
    tch::set_num_threads(config.torch_threads.max(1) as i32);
    let device = crate::cli::parse_device(&config.device)?;
    let mut artifact =
        Artifact::load(&config.model, device).with_context(|| format!("loading model {}", config.model.display()))?;
    artifact.model.set_precision(config.precision);
    if let Some(path) = &config.item_meta {
        let meta = load_item_meta(path)?;
        artifact.item_categories = std::iter::once(Vec::new())
            .chain(
                artifact
                    .items
                    .ids()
                    .iter()
                    .map(|id| meta.get(id).map(|m| m.categories.clone()).unwrap_or_default()),
            )
            .collect();
    }
    let model_version = weights_version(&config.model)?;
    let metrics = Arc::new(Metrics::new());
    let arch = format!("{:?}", artifact.config.model.arch).to_lowercase();
    metrics.model_info.with_label_values(&[&model_version, &arch]).set(1);
    metrics
        .device_info
        .with_label_values(&[
            &format!("{device:?}").to_lowercase(),
            &format!("{:?}", config.precision).to_lowercase(),
        ])
        .set(1);
    let model_config = serde_json::to_value(&artifact.config)?;
    let catalog = catalog(&artifact);
    let history_cap = config.history_cap.unwrap_or(artifact.config.model.max_len);
    let warmup_batch_sizes = std::iter::successors(Some(1usize), |&n| {
        (n < config.max_batch_size).then(|| (n * 2).min(config.max_batch_size))
    })
    .collect();
    let engine_config = EngineConfig {
        max_batch_size: config.max_batch_size,
        max_batch_delay: Duration::from_micros(config.max_batch_delay_us),
        queue_capacity: config.max_concurrent_requests.max(1) * 2,
        worker: WorkerConfig {
            device,
            cache_capacity: config.cache_capacity,
            warmup_batch_sizes,
        },
    };
    let (engine, warmed_up) = Engine::start(artifact, engine_config, metrics.clone());
    let limits = Limits {
        max_events_per_call: config.max_events_per_call,
        max_id_bytes: 256,
        max_k: 1000,
        max_candidates: config.max_candidates,
        max_batch_requests: config.max_batch_requests,
        request_timeout: Duration::from_millis(config.request_timeout_ms),
        max_body_bytes: config.max_body_bytes,
    };
    let store = Arc::new(HistoryStore::new(config.history_shards, history_cap));
    let state = Arc::new(AppState {
        store,
        engine,
        catalog,
        model_version,
        model_config,
        limits,
        metrics,
        ready: AtomicBool::new(false),
        admission: Arc::new(Semaphore::new(config.max_concurrent_requests)),
    });
    let listener = TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    let addr = listener.local_addr()?;
    let ready_state = state.clone();
    tokio::spawn(async move {
        if warmed_up.await.is_ok() {
            ready_state.set_ready();
        }
    });
    let app = api::router(state.clone());
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let finished = tokio::spawn(async move {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            let _ = stop_tx.send(());
        };
        let serving = axum::serve(listener, app).with_graceful_shutdown(signal);
        let drained = async move {
            // After the signal, in-flight requests get `grace` to finish.
            let _ = stop_rx.await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            served = serving => served.context("serving"),
            _ = drained => anyhow::bail!("in-flight requests did not finish within {grace:?} of shutdown"),
        }
    });
    Ok(RunningServer { addr, state, finished })
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = interrupt => {},
        _ = terminate.recv() => {},
    }
}
