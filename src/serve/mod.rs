//! The service: configuration, start-up (load, warm up, bind), and graceful shutdown.
mod connections;
pub mod logs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api;
use crate::data::formats::load_item_meta;
use crate::health::Health;
use crate::history::{FsyncPolicy, Histories, HistoryStore, Journal, JournalConfig, MemoryBudget};
use crate::infer::rank::RetrievalArgs;
use crate::infer::{Engine, EngineConfig, LimitConfig, WorkerConfig};
use crate::metrics::Metrics;
use crate::model::{events_to_keep, Precision};
use crate::recommend::{ApiKeys, Catalog, Limits, ModelLoader, Recommender, ServedModel};

/// `xsrec serve` settings; every flag can also come from its `XSREC_*` environment variable.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// The model artifact's directory. The default, when there is no such directory here, is the
    /// copy built into the binary.
    #[arg(long, env = "XSREC_MODEL", default_value = crate::model::builtin::DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    #[arg(long, env = "XSREC_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// How the log is written (stderr): `text` lines or `json` objects, one per event. Every
    /// failed or shed request is one warning line with its request id.
    #[arg(long, env = "XSREC_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: logs::LogFormat,
    /// Where the gRPC API (proto/xsrec/v1) listens, beside REST and over the same core; `off`
    /// for none.
    #[arg(long, env = "XSREC_GRPC_ADDR", default_value = "127.0.0.1:50051", value_parser = parse_grpc_addr)]
    pub grpc_addr: GrpcAddr,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "XSREC_DEVICE", default_value = "auto")]
    pub device: String,
    /// Inference arithmetic: fp32, or bf16 (half the memory traffic; meant for GPUs).
    #[arg(long, env = "XSREC_PRECISION", value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Item categories for /v1/interests (RecBole `.item` or TSV), replacing the artifact's.
    #[arg(long, env = "XSREC_ITEM_META")]
    pub item_meta: Option<PathBuf>,
    /// Where histories are kept durably (created if missing). Without it, histories live in
    /// memory only and a restart forgets every user.
    #[arg(long, env = "XSREC_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// With --data-dir: when acknowledged events reach the disk. `always`: before the response
    /// (concurrent writers share one fsync); `interval`: at most --fsync-interval-ms later (a
    /// killed process loses nothing, a power cut at most that window); `never`: when the OS likes.
    #[arg(long, env = "XSREC_FSYNC", value_enum, default_value_t = FsyncPolicy::Interval)]
    pub fsync: FsyncPolicy,
    #[arg(long, env = "XSREC_FSYNC_INTERVAL_MS", default_value_t = 1000)]
    pub fsync_interval_ms: u64,
    /// With --data-dir: how soon after an erasure (DELETE /v1/users/{id}) the store's files are
    /// compacted, after which the erased user's id is in no file of the data directory.
    #[arg(long, env = "XSREC_ERASURE_COMPACTION_SECS", default_value_t = 60)]
    pub erasure_compaction_secs: u64,
    /// With --data-dir: calls are logged as they come and sorted into per-user entries by an
    /// index step (on its own thread) once this many bytes of log are pending, or after 5 s.
    /// Larger steps cost less per event; the pending bytes are also held in memory.
    #[arg(long, env = "XSREC_JOURNAL_INDEX_BYTES", default_value_t = crate::history::journal::INDEX_BYTES)]
    pub journal_index_bytes: usize,
    /// Forget events older than this (by their timestamp), in memory at once and on disk at the
    /// store's next compaction: e.g. `90d`, `12h`, `30m`, `3600s` (bare numbers are seconds).
    /// Without it, events are kept until erased.
    #[arg(long, env = "XSREC_RETENTION", value_parser = parse_retention)]
    pub retention: Option<Duration>,
    /// Events kept in memory per user (the journal keeps all); defaults to the model's max_len
    /// and the event before the window (whose time the first position reads), or max_len and
    /// half of it for a model that serves incrementally (`--positions window-start`).
    #[arg(long, env = "XSREC_HISTORY_CAP")]
    pub history_cap: Option<usize>,
    /// Serve `/metrics` (and the health endpoints) on this address, and not `/metrics` on
    /// --addr: a scrape port that clients cannot reach. Default: everything on --addr.
    #[arg(long, env = "XSREC_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// API keys, one per line: `TOKEN SCOPE[,SCOPE…]` with scopes `read` (recommend, interests,
    /// history, model), `write` (events, erasure), `admin`; `#` starts a comment. With keys, every
    /// /v1 call (REST `Authorization: Bearer TOKEN`, gRPC `authorization` metadata) needs one with
    /// the scope; health and metrics stay open. Without keys, anyone may call anything.
    #[arg(long, env = "XSREC_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// More API keys inline, entries separated by `;` (the environment is the place for them: a
    /// command line is visible to every user of the machine). Never printed.
    #[arg(long, env = "XSREC_API_KEYS", hide_env_values = true, value_parser = ApiKeys::parse)]
    pub api_keys: Option<ApiKeys>,
    /// With --data-dir: bytes the in-memory histories may hold (as `xsrec_history_bytes` counts
    /// them; suffixes K, M, G for powers of 1024). Past it, the least recently active users leave
    /// memory, not the store, and are read back on their next request. Default: no limit.
    #[arg(long, env = "XSREC_MAX_MEMORY_BYTES", value_parser = parse_bytes)]
    pub max_memory_bytes: Option<u64>,
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
    /// Queue delay the inference engine aims to stay under: while even the least-waiting
    /// request of every batch in 100 ms waited longer, fewer requests are let in (the rest get
    /// 429 at once), so admitted ones stay fast under overload. 0 keeps the static limit
    /// (--max-concurrent-requests) only.
    #[arg(long, env = "XSREC_QUEUE_DELAY_TARGET_MS", default_value_t = 5)]
    pub queue_delay_target_ms: u64,
    #[arg(long, env = "XSREC_REQUEST_TIMEOUT_MS", default_value_t = 2000)]
    pub request_timeout_ms: u64,
    /// Open client connections at most, per port (REST, gRPC, admin); past it, new ones wait in
    /// the kernel's accept backlog.
    #[arg(long, env = "XSREC_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// How long a client may take to send a request's headers; also how long an idle
    /// keep-alive connection is kept. On the gRPC port: how long a new connection may stay
    /// silent (an established channel may idle).
    #[arg(long, env = "XSREC_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send a request's body (408 `body_timeout` after). Requests
    /// are admitted only once their body is in, so slow senders hold no admission permit.
    #[arg(long, env = "XSREC_BODY_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_read_timeout_ms: u64,
    /// An origin browsers may call the API from (CORS), e.g. `https://shop.example`; repeat it
    /// or separate with commas; `*` allows any. None (the default): no CORS headers.
    #[arg(long, env = "XSREC_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<axum::http::HeaderValue>,
    #[arg(long, env = "XSREC_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    #[arg(long, env = "XSREC_MAX_EVENTS_PER_CALL", default_value_t = 1000)]
    pub max_events_per_call: usize,
    #[arg(long, env = "XSREC_MAX_CANDIDATES", default_value_t = 10_000)]
    pub max_candidates: usize,
    #[arg(long, env = "XSREC_MAX_BATCH_REQUESTS", default_value_t = 256)]
    pub max_batch_requests: usize,
    #[command(flatten)]
    pub retrieval: RetrievalArgs,
    /// Users whose final hidden state the inference worker keeps.
    #[arg(long, env = "XSREC_CACHE_CAPACITY", default_value_t = 100_000)]
    pub cache_capacity: usize,
    /// Bytes of keys and values kept for incremental inference (models trained with
    /// `--positions window-start`): each user holds max_len × layers × d × 2 values; the least
    /// recently used are evicted beyond it and recomputed when they return.
    #[arg(long, env = "XSREC_CACHE_BYTES", default_value_t = 1 << 30)]
    pub cache_bytes: usize,
    /// Storage precision of those keys and values (default: the model's). bf16 halves their
    /// memory; answers then differ from a full pass within bf16 rounding.
    #[arg(long, env = "XSREC_CACHE_PRECISION", value_enum)]
    pub cache_precision: Option<Precision>,
    /// libtorch intra-op threads. One is fastest on CPU here: the inference worker already runs
    /// beside the HTTP threads, and waking a second math thread for small batches costs more
    /// than it saves (measured in docs/BENCHMARKS.md).
    #[arg(long, env = "XSREC_TORCH_THREADS", default_value_t = 1)]
    pub torch_threads: usize,
    /// Nice value of the HTTP threads (0..=19; the inference worker stays at 0), so that under
    /// CPU contention answering admitted requests wins over accepting and rejecting new ones.
    #[arg(long, env = "XSREC_HTTP_THREAD_NICE", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub http_thread_nice: i32,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[arg(long, env = "XSREC_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
}

/// The keys from `--api-keys-file` and `--api-keys` together; warns loudly when a listener is
/// reachable from other machines and nothing authenticates callers.
fn api_keys(config: &ServeConfig) -> anyhow::Result<ApiKeys> {
    let from_file = match &config.api_keys_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading --api-keys-file {}", path.display()))?;
            ApiKeys::parse(&text).map_err(|e| anyhow::anyhow!("--api-keys-file {}: {e}", path.display()))?
        }
        None => ApiKeys::default(),
    };
    let keys = from_file
        .merged(config.api_keys.clone().unwrap_or_default())
        .map_err(|e| anyhow::anyhow!("API keys: {e}"))?;
    let exposed = [Some(config.addr), config.grpc_addr.0]
        .into_iter()
        .flatten()
        .filter(|addr| !addr.ip().is_loopback())
        .collect::<Vec<_>>();
    if keys.is_empty() && !exposed.is_empty() {
        tracing::warn!(
            "WARNING: listening on {exposed:?}, reachable from other machines, WITHOUT API keys: anyone \
             who can connect may read every history, write events and erase users \
             (--api-keys-file / XSREC_API_KEYS)"
        );
    } else if !keys.is_empty() {
        tracing::info!("API keys: {} configured; /v1 calls need one", keys.len());
    }
    Ok(keys)
}

/// A listener on `addr` when there is one (`flag` names it in errors), and where it is bound.
async fn bind_optional(
    addr: Option<SocketAddr>,
    flag: &str,
) -> anyhow::Result<(Option<TcpListener>, Option<SocketAddr>)> {
    let Some(addr) = addr else { return Ok((None, None)) };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {flag} {addr}"))?;
    let bound = listener.local_addr()?;
    Ok((Some(listener), Some(bound)))
}

/// `--grpc-addr`: an address, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcAddr(pub Option<SocketAddr>);

fn parse_grpc_addr(text: &str) -> Result<GrpcAddr, String> {
    match text {
        "off" => Ok(GrpcAddr(None)),
        _ => text
            .parse()
            .map(|addr| GrpcAddr(Some(addr)))
            .map_err(|e| format!("`{text}` is neither an address (host:port) nor `off`: {e}")),
    }
}

/// A positive whole number with an optional unit from `units` (unit, multiplier).
fn parse_quantity(text: &str, units: &[(&str, u64)]) -> Result<u64, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let Some(&(_, per)) = units.iter().find(|(name, _)| *name == unit) else {
        let known: Vec<&str> = units.iter().map(|(name, _)| *name).filter(|n| !n.is_empty()).collect();
        return Err(format!("unknown unit `{unit}` (use {})", known.join(", ")));
    };
    match number.parse::<u64>() {
        Ok(n) if n > 0 => n.checked_mul(per).ok_or_else(|| "too large".to_owned()),
        _ => Err(format!(
            "expected a positive whole number with an optional unit, got `{text}`"
        )),
    }
}

fn parse_retention(text: &str) -> Result<Duration, String> {
    let units = [("", 1), ("s", 1), ("m", 60), ("h", 3600), ("d", 86_400)];
    parse_quantity(text, &units).map(Duration::from_secs)
}

fn parse_bytes(text: &str) -> Result<u64, String> {
    parse_quantity(text, &[("", 1), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)])
}

impl ServeConfig {
    /// The settings that `xsrec serve ARGS…` would have (for embedding the server: tests, fuzz
    /// targets); `args` are the flags alone.
    pub fn from_args(args: &[&str]) -> Result<Self, clap::Error> {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            config: ServeConfig,
        }
        use clap::Parser;
        Flags::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).map(|flags| flags.config)
    }
}

/// A started server: its addresses, and the task that ends when it has shut down.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub grpc_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub core: Arc<Recommender>,
    pub finished: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Loads the model, starts the engine and begins serving; readiness flips once warm-up is done.
/// The server stops when `shutdown` completes, letting in-flight requests finish.
pub async fn start(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningServer> {
    tch::set_num_threads(config.torch_threads.max(1) as i32);
    let device = crate::model::parse_device(&config.device)?;
    let item_meta = match &config.item_meta {
        Some(path) => Some(Arc::new(
            load_item_meta(path).with_context(|| format!("loading --item-meta {}", path.display()))?,
        )),
        None => None,
    };
    let loader = ModelLoader {
        device,
        precision: config.precision,
        item_meta,
    };
    let (artifact, model_version) = loader.load(&config.model)?;
    let metrics = Arc::new(Metrics::new());
    metrics.set_serving_model(&model_version, artifact.config.model.arch);
    metrics
        .device_info
        .with_label_values(&[
            &format!("{device:?}").to_lowercase(),
            &format!("{:?}", config.precision).to_lowercase(),
        ])
        .set(1);
    let model_config = serde_json::to_value(&artifact.config)?;
    let catalog = Arc::new(Catalog::new(&artifact));
    let appendable = artifact.model.net.can_append();
    let keep = events_to_keep(artifact.config.model.max_len, appendable);
    let history_cap = config.history_cap.unwrap_or(keep);
    if appendable && history_cap < keep {
        // Each new event then trims the window's first, so no cached prefix survives it.
        tracing::warn!(
            "--history-cap {history_cap} is below the {keep} events this model needs per user to serve \
             incrementally: every changed history will be recomputed in full"
        );
    }
    let warmup_batch_sizes = std::iter::successors(Some(1usize), |&n| {
        (n < config.max_batch_size).then(|| (n * 2).min(config.max_batch_size))
    })
    .collect();
    let request_timeout = Duration::from_millis(config.request_timeout_ms);
    let engine_config = EngineConfig {
        max_batch_size: config.max_batch_size,
        max_batch_delay: Duration::from_micros(config.max_batch_delay_us),
        limit: LimitConfig {
            target: Duration::from_millis(config.queue_delay_target_ms),
            interval: Duration::from_millis(100),
            min: config.max_batch_size,
            max: config.max_concurrent_requests.max(1),
        },
        worker: WorkerConfig {
            device,
            cache_capacity: config.cache_capacity,
            prefix_bytes: config.cache_bytes,
            prefix_precision: config.cache_precision,
            retrieval: config.retrieval.retrieval(),
            warmup_batch_sizes,
            max_request_age: request_timeout + Duration::from_secs(1),
        },
    };
    let health = Arc::new(Health::default());
    let (engine, warmed_up, slot) = Engine::start(artifact, engine_config, metrics.clone(), health.clone());
    let served = ServedModel {
        version: model_version,
        config: model_config,
        catalog: catalog.clone(),
        dir: config.model.clone(),
        slot,
    };
    let limits = Limits {
        max_events_per_call: config.max_events_per_call,
        max_id_chars: crate::recommend::MAX_ID_CHARS,
        max_k: crate::recommend::types::MAX_K,
        max_candidates: config.max_candidates,
        max_batch_requests: config.max_batch_requests,
        request_timeout,
        max_body_bytes: config.max_body_bytes,
    };
    let journal = match &config.data_dir {
        Some(dir) => {
            let journal = Journal::open(JournalConfig {
                dir: dir.clone(),
                fsync: config.fsync,
                fsync_interval: Duration::from_millis(config.fsync_interval_ms),
                erasure_compaction_delay: Duration::from_secs(config.erasure_compaction_secs),
                retention: config.retention,
                index_bytes: config.journal_index_bytes,
                background_nice: config.http_thread_nice,
            })
            .with_context(|| format!("opening the history store in {}", dir.display()))?;
            tracing::info!(
                "histories: durable in {} (fsync {:?}{}); memory keeps the newest {history_cap} events per user",
                dir.display(),
                config.fsync,
                match config.fsync {
                    FsyncPolicy::Interval => format!(", every {} ms", config.fsync_interval_ms),
                    _ => String::new(),
                }
            );
            Some(journal)
        }
        None => {
            tracing::info!("histories: in memory only (no --data-dir): a restart forgets every user");
            None
        }
    };
    let api_keys = api_keys(&config)?;
    let mut histories = Histories::with_journal(config.history_shards, history_cap, journal.clone());
    let memory_catalog = Arc::new(RwLock::new(catalog.clone()));
    if let Some(max_bytes) = config.max_memory_bytes {
        let resolving = memory_catalog.clone();
        histories = histories
            .with_budget(MemoryBudget {
                max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
                resolve: Arc::new(move |logged| {
                    let catalog = resolving.read().unwrap_or_else(|e| e.into_inner());
                    catalog.resolve_logged(logged)
                }),
            })
            .context("--max-memory-bytes")?;
        metrics
            .history_budget_bytes
            .set(i64::try_from(max_bytes).unwrap_or(i64::MAX));
        tracing::info!(
            "histories: memory holds at most {max_bytes} bytes; the least recently active users leave it past that"
        );
    }
    let histories = Arc::new(histories);
    let core = Arc::new(Recommender {
        store: histories.clone(),
        engine,
        served: RwLock::new(Arc::new(served)),
        memory_catalog,
        loader,
        reloading: Default::default(),
        limits,
        metrics,
        health: health.clone(),
        admission: Arc::new(Semaphore::new(config.max_concurrent_requests)),
        scrape: Default::default(),
        api_keys,
    });
    let listener = TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    let addr = listener.local_addr()?;
    let (grpc_listener, grpc_addr) = bind_optional(config.grpc_addr.0, "--grpc-addr").await?;
    let (admin_listener, admin_addr) = bind_optional(config.admin_addr, "--admin-addr").await?;
    // Live at once, ready once the histories are back and the model is warm.
    let recovering = core.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        match histories.recover(|logged| catalog.resolve_logged(logged)) {
            Ok(0) => recovering.health.set_recovered(),
            Ok(events) => {
                let users = histories.stats().users;
                tracing::info!(
                    "recovered {events} events of {users} users in {:.2} s",
                    started.elapsed().as_secs_f64()
                );
                recovering.health.set_recovered();
            }
            Err(error) => recovering.health.fail(format!("recovering histories: {error}")),
        }
    });
    if let Some(retention) = config.retention {
        tokio::spawn(expire_periodically(core.clone(), retention));
    }
    tokio::spawn(reload_on_hangup(core.clone()));
    let warming = health.clone();
    tokio::spawn(async move {
        if warmed_up.await.is_ok() {
            warming.set_warmed_up();
        }
    });
    // A journal that cannot write refuses every later write: the service stops for good, so
    // that its orchestrator replaces it (liveness alone would keep it up, unready, forever).
    if let Some(journal) = journal.clone() {
        let failing = health.clone();
        tokio::spawn(async move {
            let error = journal.failed().await;
            failing.fail(format!("the history store failed: {error}"));
        });
    }
    let body_read_timeout = Duration::from_millis(config.body_read_timeout_ms);
    let app = api::router(
        core.clone(),
        &api::HttpOptions {
            body_read_timeout,
            with_metrics: admin_listener.is_none(),
            cors_allow_origins: config.cors_allow_origin.clone(),
        },
    );
    let admin_app = api::admin_router(core.clone());
    let connection_limits = connections::ConnectionLimits {
        max_connections: config.max_connections,
        header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
    };
    let connection_metrics = core.metrics.clone();
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let grpc_core = core.clone();
    let finished = tokio::spawn(async move {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (stop_grpc_tx, stop_grpc_rx) = tokio::sync::oneshot::channel::<()>();
        let (stop_admin_tx, stop_admin_rx) = tokio::sync::oneshot::channel::<()>();
        let draining = health.clone();
        let failed = health.clone();
        let signal = async move {
            tokio::select! {
                _ = shutdown => {}
                _ = failed.failed() => {}
            }
            // Readiness goes 503 first, so balancers stop sending while in-flight work finishes.
            draining.start_draining();
            let _ = stop_tx.send(());
            let _ = stop_grpc_tx.send(());
            let _ = stop_admin_tx.send(());
        };
        let grpc_serving = grpc_listener.map(|listener| {
            let failing = grpc_core.health.clone();
            let incoming =
                connections::capped_incoming(listener, connection_limits.clone(), connection_metrics.clone());
            let stopped = async move {
                let _ = stop_grpc_rx.await;
            };
            tokio::spawn(async move {
                if let Err(error) = crate::grpc::serve(grpc_core, body_read_timeout, incoming, stopped).await {
                    failing.fail(format!("the gRPC server failed: {error:#}"));
                }
            })
        });
        let admin_serving = admin_listener.map(|listener| {
            let stopped = async move {
                let _ = stop_admin_rx.await;
            };
            let (limits, metrics) = (connection_limits.clone(), connection_metrics.clone());
            tokio::spawn(connections::serve(listener, admin_app, limits, metrics, stopped))
        });
        let serving = async move {
            connections::serve(listener, app, connection_limits, connection_metrics, signal).await;
            for other in [grpc_serving, admin_serving].into_iter().flatten() {
                let _ = other.await;
            }
        };
        let drained = async move {
            // After the signal, in-flight requests get `grace` to finish.
            let _ = stop_rx.await;
            tokio::time::sleep(grace).await;
        };
        let outcome = tokio::select! {
            () = serving => Ok(()),
            _ = drained => Err(anyhow::anyhow!("in-flight requests did not finish within {grace:?} of shutdown")),
        };
        if let Some(journal) = journal {
            // Everything acknowledged is written; this makes it fsynced too before the exit.
            tokio::task::spawn_blocking(move || journal.close()).await?;
        }
        if let Some(reason) = health.failure() {
            anyhow::bail!("stopped because the service failed: {reason}");
        }
        outcome
    });
    Ok(RunningServer {
        addr,
        grpc_addr,
        admin_addr,
        core,
        finished,
    })
}

/// Retention in memory: every quarter of the retention (between 1 s and a minute), the events
/// past it leave memory; the journal drops them from disk at its own compactions.
async fn expire_periodically(core: Arc<Recommender>, retention: Duration) {
    let mut every = tokio::time::interval((retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)));
    loop {
        every.tick().await;
        let horizon = crate::history::retention_horizon(retention);
        let store = core.store.clone();
        let Ok(expired) = tokio::task::spawn_blocking(move || store.expire(horizon)).await else {
            return;
        };
        core.metrics.expired_events.inc_by(expired.events as u64);
    }
}

/// SIGHUP reloads the served model from its directory (what `POST /admin/v1/model` with an
/// empty body does); the outcome is logged.
async fn reload_on_hangup(core: Arc<Recommender>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return tracing::warn!("SIGHUP cannot be handled here: reload the model with POST /admin/v1/model");
    };
    while hangups.recv().await.is_some() {
        let _ = core.reload(None).await;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_takes_whole_numbers_with_a_unit() {
        assert_eq!(parse_retention("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_retention("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_retention("30m"), Ok(Duration::from_secs(1_800)));
        assert_eq!(parse_retention("3600"), Ok(Duration::from_secs(3_600)));
        assert_eq!(parse_retention("5s"), Ok(Duration::from_secs(5)));
        for bad in ["", "0d", "d", "1.5h", "-3d", "7w", "99999999999999999999d"] {
            assert!(parse_retention(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn byte_sizes_take_binary_suffixes() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("200M"), Ok(200 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        for bad in ["", "0", "1.5G", "2T", "M", "-1", "99999999999999999999G"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert!(parse_bytes("2T").unwrap_err().contains("K, M, G"));
    }
}
