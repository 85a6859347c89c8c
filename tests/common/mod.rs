//! What the black-box test binaries share: one small model trained on a synthetic log, and a
//! server on an ephemeral port with a client. Each binary uses only part of it.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tch::Device;
use xsrec::data::split::{build_sequences, SequenceSet};
use xsrec::data::synth::{synthesize, SynthConfig};
use xsrec::data::vocab::Vocab;
use xsrec::data::Event;
use xsrec::model::artifact::Artifact;
use xsrec::model::{Features, ModelConfig};
use xsrec::serve::{start, RunningServer, ServeConfig};
use xsrec::train::{train, Batching, Loss, TrainConfig};

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub model: PathBuf,
    pub events: Vec<Event>,
}

/// The small model every test training starts from: a one-layer Transformer with two heads, an
/// FFN twice its width, the default features and 30-minute sessions. Tests change fields with `..`.
pub fn small_model(set: &SequenceSet, max_len: usize, d_model: usize) -> ModelConfig {
    ModelConfig {
        arch: xsrec::model::Arch::Transformer,
        num_items: set.items.len(),
        num_event_types: set.event_types.len(),
        max_len,
        d_model,
        n_heads: 2,
        n_layers: 1,
        ffn_dim: 2 * d_model,
        dropout: 0.1,
        tied_output: true,
        features: Features::default(),
        session_gap_secs: 1800,
    }
}

/// The short recipe every test training uses: the full softmax with the user's earlier items
/// masked, batches of 64 at a constant 3e-3, and a patience as long as the run, so that it
/// trains `epochs` epochs. Tests change fields with `..`.
pub fn quick_training(seed: u64, epochs: usize) -> TrainConfig {
    TrainConfig {
        seed,
        max_epochs: epochs,
        batch_size: 64,
        batching: Batching::Grouped,
        learning_rate: 3e-3,
        lr_decay_epochs: None,
        weight_decay: 0.0,
        grad_clip: 1.0,
        patience: epochs,
        loss: Loss::Full,
        negatives: 0,
        mask_seen: true,
        session_start_weight: 1.0,
        device: Device::Cpu,
        progress: false,
        checkpoint: None,
    }
}

/// One small model for every test in this binary, trained once.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let events = synthesize(&SynthConfig::new(300, 150, 4));
        let set = build_sequences(&events, Vocab::new(), Vocab::new(), true);
        let config = small_model(&set, 30, 16);
        let cfg = quick_training(1, 2);
        let model = train(&set, config, &cfg).expect("trains").model;
        let dir = tempfile::tempdir().unwrap();
        let item_categories = (0..set.items.len())
            .map(|i| match i {
                0 => vec![],
                i if i % 3 == 0 => vec!["even".to_string(), "three".into()],
                i if i % 2 == 0 => vec!["even".to_string()],
                _ => vec!["odd".to_string()],
            })
            .collect();
        let item_counts = set.train_item_counts();
        let artifact = Artifact::new(
            model,
            set.items,
            set.event_types,
            item_counts,
            item_categories,
            json!({}),
        );
        artifact.save(dir.path()).unwrap();
        Fixture {
            model: dir.path().to_path_buf(),
            _dir: dir,
            events,
        }
    })
}

pub fn config(model: &Path, extra: &[&str]) -> ServeConfig {
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    ServeConfig::from_args(&args).unwrap()
}

pub struct Server {
    pub running: RunningServer,
    pub base: String,
    pub client: reqwest::Client,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
}

pub async fn server(extra: &[&str]) -> Server {
    server_for(&fixture().model, extra).await
}

/// A server for `model`, once it is ready (at most 60 s).
pub async fn server_for(model: &Path, extra: &[&str]) -> Server {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(config(model, extra), async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    let server = Server {
        running,
        base,
        client,
        stop: Some(stop),
    };
    server.wait_ready(Duration::from_secs(60)).await;
    server
}

impl Server {
    pub async fn wait_ready(&self, limit: Duration) {
        let started = std::time::Instant::now();
        while self.get("/health/ready").await.0 != StatusCode::OK {
            assert!(started.elapsed() < limit, "server not ready within {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        let response = self.client.get(format!("{}{path}", self.base)).send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    }

    pub async fn ingest(&self, events: &[&Event]) {
        for chunk in events.chunks(500) {
            let body: Vec<Value> = chunk
                .iter()
                .map(|e| json!({"user_id": e.user_id, "item_id": e.item_id, "timestamp": e.timestamp, "event_type": e.event_type}))
                .collect();
            let (status, reply) = self.post("/v1/events", &json!({ "events": body })).await;
            assert_eq!(status, StatusCode::OK, "{reply}");
        }
    }

    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.get("/metrics").await.1, name)
    }
}

/// The value of an unlabelled metric in a Prometheus exposition.
pub fn metric_value(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

/// The timestamps of a history answer's events, oldest first.
pub fn history_timestamps(history: &Value) -> Vec<i64> {
    history["events"]
        .as_array()
        .expect("a history answer")
        .iter()
        .map(|event| event["timestamp"].as_i64().unwrap())
        .collect()
}

pub fn users(events: &[Event]) -> BTreeMap<&str, Vec<&Event>> {
    let mut by_user: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        by_user.entry(&e.user_id).or_default().push(e);
    }
    by_user
}

/// (item id, score) pairs of a recommend response.
pub fn ranked(reply: &Value) -> Vec<(String, f64)> {
    reply["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["item_id"].as_str().unwrap().to_owned(), i["score"].as_f64().unwrap()))
        .collect()
}

impl Server {
    /// Graceful shutdown, as on SIGTERM; returns how the server ended.
    pub async fn shut_down(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().expect("running").send(());
        self.running.finished.await?
    }

    pub async fn delete(&self, path: &str) -> StatusCode {
        let url = format!("{}{path}", self.base);
        self.client.delete(url).send().await.unwrap().status()
    }
}

/// `xsrec serve` as a separate process (for kills and fault injection), on an ephemeral port.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub base: String,
    pub lines: std::sync::mpsc::Receiver<String>,
    /// What it wrote before it listened (the configuration, recovery).
    pub startup: Vec<String>,
}

impl ServerProcess {
    /// The Prometheus exposition of the running process.
    pub async fn metrics(&self, client: &reqwest::Client) -> String {
        let response = client.get(format!("{}/metrics", self.base)).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// `GET path`'s JSON body.
    pub async fn get_json(&self, client: &reqwest::Client, path: &str) -> Value {
        let response = client.get(format!("{}{path}", self.base)).send().await.unwrap();
        response.json().await.unwrap()
    }

    /// `POST path` with a JSON body: the response, its status and body unread.
    pub async fn post(&self, client: &reqwest::Client, path: &str, body: &Value) -> reqwest::Response {
        let request = client.post(format!("{}{path}", self.base)).json(body);
        request.send().await.unwrap()
    }

    pub fn spawn(model: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let args = [&["--model", model.to_str().unwrap()], extra].concat();
        Self::spawn_in(Path::new("."), &args, env)
    }

    /// `xsrec serve ARGS` (on ephemeral ports, CPU) started in the directory `cwd`.
    pub fn spawn_in(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_xsrec"))
            .arg("serve")
            .args(["--addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--device", "cpu"])
            .args(args)
            .envs(env.iter().copied())
            .current_dir(cwd)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let mut startup = Vec::new();
        let base = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("no start-up line ({e}); the server said:\n{}", startup.join("\n")));
            // A log line (text or JSON) whose message starts so.
            if let Some((_, rest)) = line.split_once("listening on http://") {
                let address = rest.split(|c: char| c.is_whitespace() || c == '"').next().unwrap();
                break format!("http://{address}");
            }
            startup.push(line);
        };
        Self {
            child,
            base,
            lines,
            startup,
        }
    }

    pub async fn wait_ready(&self, client: &reqwest::Client, limit: Duration) {
        let started = std::time::Instant::now();
        loop {
            let ready = client.get(format!("{}/health/ready", self.base)).send().await;
            if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
                return;
            }
            assert!(started.elapsed() < limit, "server not ready within {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL: no drain, no final fsync
        let _ = self.child.wait();
    }

    /// Waits (at most `limit`) for the process to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < limit, "server still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr_so_far(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// The rest of stderr, up to its end; for a process that has exited (the reader thread may
    /// still be passing its last lines on when the exit is seen).
    pub fn stderr_to_end(&self) -> Vec<String> {
        self.lines.iter().collect()
    }

    /// Reads stderr until a line that contains every one of `needles` (returned with the lines
    /// before it): what a request changed is visible to clients a moment before its log line is
    /// written and read.
    pub fn wait_for_line(&self, needles: &[&str], limit: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + limit;
        let mut read = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = needles.iter().all(|needle| line.contains(needle));
                    read.push(line);
                    if found {
                        return read;
                    }
                }
                Err(_) => panic!("no line containing {needles:?} within {limit:?}: {read:?}"),
            }
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Drives `server` with the load generator through `target` (REST or gRPC) in the fresh and the
/// ingest workloads, and checks its report against what the server counted.
pub async fn check_load_generator(server: &Server, target: xsrec::bench::load::Target) {
    use xsrec::bench::load::{preload, run_level, Mode, Workload};
    let artifact = Artifact::load(&fixture().model, Device::Cpu).unwrap();
    let workload = Workload {
        mode: Mode::Fresh,
        users: 40,
        item_ids: artifact.items.ids().into(),
        k: 5,
        ingest_batch: 10,
        seed: 1,
    };
    // 12 events per user in calls of at most 5: every history spans calls.
    let preloaded = preload(&target, &workload, 12, 5, 4).await.unwrap();
    assert_eq!(preloaded.events, 480);
    assert_eq!(server.metric("xsrec_users").await, 40.0);
    assert_eq!(server.metric("xsrec_history_events").await, 480.0);
    let level = run_level(&target, &workload, 8, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(level.errors, 0, "{:?}", level.first_error);
    assert!(level.requests > 0);
    let batched: f64 = level.server.batch_size_histogram.iter().map(|(_, n)| n).sum();
    assert_eq!(batched, level.server.batches);
    // No cache: every recommendation went through a batch of its own or a shared one.
    // (mean × count re-multiplies a quotient: allow its rounding.)
    assert!(level.server.mean_batch_size * level.server.batches >= level.requests as f64 - 1e-6);
    assert!(level.p50_ms <= level.p99_ms && level.p99_ms <= level.max_ms);

    // Ingest mode: every acknowledged call stored its whole batch.
    let ingested = server.metric("xsrec_events_ingested_total").await;
    let ingest = Workload {
        mode: Mode::Ingest,
        ..workload
    };
    let level = run_level(&target, &ingest, 4, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(level.errors, 0, "{:?}", level.first_error);
    let stored = server.metric("xsrec_events_ingested_total").await - ingested;
    assert_eq!(stored, (level.requests * 10) as f64);
    assert!((level.events_per_sec - stored / level.seconds).abs() < 1e-6);
}

/// One gRPC call to `method` (a full path, `/xsrec.v1.Recommender/…`) whose messages are
/// whatever `messages` encode to, sent as they come: bytes no generated client would send. A bearer `key`, if any.
/// The server's answer is expected to be a failure; this returns its status.
pub async fn grpc_call_with<M>(
    server: &Server,
    method: &'static str,
    key: Option<&str>,
    messages: impl tokio_stream::Stream<Item = M> + Send + 'static,
) -> tonic::Status
where
    M: prost::Message + Send + Sync + 'static,
{
    let addr = server.running.grpc_addr.expect("gRPC is on in tests");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(messages);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    let codec = tonic_prost::ProstCodec::<M, xsrec::grpc::pb::IngestEventsResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    match grpc.client_streaming(request, path, codec).await {
        Ok(reply) => panic!("{method} accepted what it should refuse: {:?}", reply.into_inner()),
        Err(status) => status,
    }
}
