//! Prometheus metrics of the service, all registered at start so `/metrics` is never empty.
//! Names carry the `xsrec_` prefix and base units; labels take small fixed value sets only.
use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_failures: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_wait: Histogram,
    pub inference_duration: Histogram,
    pub topk_duration: Histogram,
    pub batch_size: Histogram,
    /// Requests answered by the inference worker; divided by `executions`, the average batch.
    pub inferences: IntCounter,
    pub executions: IntCounter,
    pub queue_depth: IntGauge,
    pub inference_limit: IntGauge,
    pub users: IntGauge,
    pub events_held: IntGauge,
    pub history_bytes: IntGauge,
    pub history_budget_bytes: IntGauge,
    pub evictions: IntCounter,
    pub reloads: IntCounter,
    pub reload_seconds: Counter,
    pub events_ingested: IntCounter,
    pub expired_events: IntCounter,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub cached_states: IntGauge,
    pub cache_appends: IntCounter,
    pub cache_evictions: IntCounter,
    pub cached_bytes: IntGauge,
    pub ranking_bytes: IntGauge,
    pub worker_failures: IntCounter,
    pub journal_batches: IntCounter,
    pub journal_events: IntCounter,
    pub journal_fsyncs: IntCounter,
    pub journal_fsync_seconds: Counter,
    pub journal_disk_bytes: IntGauge,
    pub ready: IntGauge,
    pub open_connections: IntGauge,
    pub model_info: IntGaugeVec,
    pub model_reloads: IntCounterVec,
    pub device_info: IntGaugeVec,
}

impl Metrics {
    /// Names the model serving new requests in `xsrec_model_info` (the only series left).
    pub fn set_serving_model(&self, version: &str, arch: crate::model::Arch) {
        let arch = format!("{arch:?}").to_lowercase();
        self.model_info.reset();
        self.model_info.with_label_values(&[version, &arch]).set(1);
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
            registry.register(Box::new(c.clone())).expect("unique metric name");
            c
        }
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            reg(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("histogram"),
            )
        };
        let counter = |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).expect("counter"));
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).expect("gauge"));
        Self {
            requests: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new("xsrec_requests_total", "HTTP requests by route and status"),
                    &["route", "status"],
                )
                .expect("counter"),
            ),
            request_failures: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "xsrec_request_failures_total",
                        "Failed HTTP requests by route and reason",
                    ),
                    &["route", "reason"],
                )
                .expect("counter"),
            ),
            request_duration: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new("xsrec_request_duration_seconds", "Total request time by route")
                        .buckets(LATENCY_BUCKETS.to_vec()),
                    &["route"],
                )
                .expect("histogram"),
            ),
            queue_wait: histogram(
                "xsrec_queue_wait_seconds",
                "Time from enqueue to the start of its batch",
                LATENCY_BUCKETS,
            ),
            inference_duration: histogram(
                "xsrec_inference_duration_seconds",
                "Forward pass time per batch",
                LATENCY_BUCKETS,
            ),
            topk_duration: histogram(
                "xsrec_topk_duration_seconds",
                "Scoring and top-k time per batch",
                LATENCY_BUCKETS,
            ),
            batch_size: histogram("xsrec_batch_size", "Requests per executed batch", BATCH_BUCKETS),
            inferences: counter(
                "xsrec_inference_requests_total",
                "Requests answered by the inference worker",
            ),
            executions: counter(
                "xsrec_batch_executions_total",
                "Batches executed by the inference worker",
            ),
            queue_depth: gauge("xsrec_queue_depth", "Requests waiting for a batch"),
            inference_limit: gauge(
                "xsrec_inference_limit",
                "Requests the engine admits at once, adapted to its queue delay (--queue-delay-target-ms)",
            ),
            users: gauge("xsrec_users", "Users with a history in memory"),
            events_held: gauge("xsrec_history_events", "Events held in memory"),
            history_bytes: gauge("xsrec_history_bytes", "Approximate bytes of the in-memory histories"),
            history_budget_bytes: gauge(
                "xsrec_history_budget_bytes",
                "--max-memory-bytes: the histories' budget (0: none)",
            ),
            evictions: counter(
                "xsrec_history_evictions_total",
                "Users that left memory (not the store) for the memory budget",
            ),
            reloads: counter(
                "xsrec_history_reloads_total",
                "Evicted users read back from the store on their next request",
            ),
            reload_seconds: reg(
                &registry,
                Counter::new(
                    "xsrec_history_reload_seconds_total",
                    "Time spent reading evicted users back",
                )
                .expect("counter"),
            ),
            events_ingested: counter("xsrec_events_ingested_total", "Events accepted by /v1/events"),
            expired_events: counter(
                "xsrec_expired_events_total",
                "Events dropped from memory for being older than --retention",
            ),
            cache_hits: counter(
                "xsrec_cache_hits_total",
                "Recommendations served from a cached user state",
            ),
            cache_misses: counter(
                "xsrec_cache_misses_total",
                "Recommendations that needed a Transformer pass",
            ),
            cached_states: gauge(
                "xsrec_cached_states",
                "Users whose hidden state the inference worker holds",
            ),
            cache_appends: counter(
                "xsrec_cache_appends_total",
                "Cache misses computed from the user's cached keys and values: only the positions after them",
            ),
            cache_evictions: counter(
                "xsrec_cache_evictions_total",
                "User states dropped to make room (capacity in users or the key/value byte budget); an evicted user is recomputed on demand",
            ),
            cached_bytes: gauge(
                "xsrec_cached_state_bytes",
                "Bytes of hidden states, keys and values the inference worker holds",
            ),
            ranking_bytes: gauge(
                "xsrec_ranking_bytes",
                "Bytes the ranking holds besides the models' item tables (the packed fp32 copy, or the first stage's smaller copy), over the models held",
            ),
            worker_failures: counter(
                "xsrec_inference_failures_total",
                "Inference batches that failed (their requests got inference_failed)",
            ),
            journal_batches: counter(
                "xsrec_journal_batches_total",
                "Write batches committed to the history journal (one per group commit)",
            ),
            journal_events: counter("xsrec_journal_events_total", "Events written to the history journal"),
            journal_fsyncs: counter("xsrec_journal_fsyncs_total", "fsyncs of the history journal"),
            journal_fsync_seconds: reg(
                &registry,
                Counter::new("xsrec_journal_fsync_seconds_total", "Time spent in journal fsyncs").expect("counter"),
            ),
            journal_disk_bytes: gauge("xsrec_journal_disk_bytes", "Bytes the history journal takes on disk"),
            ready: gauge("xsrec_ready", "1 when the service is ready to serve, else 0"),
            open_connections: gauge("xsrec_open_connections", "Client connections open (--max-connections)"),
            model_info: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new("xsrec_model_info", "The model serving new requests (value 1)"),
                    &["version", "arch"],
                )
                .expect("gauge"),
            ),
            model_reloads: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "xsrec_model_reloads_total",
                        "Model reloads by outcome (ok, or the error code that refused it)",
                    ),
                    &["outcome"],
                )
                .expect("counter"),
            ),
            device_info: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new("xsrec_device_info", "The inference device and arithmetic (value 1)"),
                    &["device", "precision"],
                )
                .expect("gauge"),
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("utf-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
