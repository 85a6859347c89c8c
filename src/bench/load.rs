//! A load generator for `xsrec serve`, so a machine without wrk (or network) can still be
//! measured: it preloads users' histories through `/v1/events`, then keeps a fixed number of
//! requests in flight (or starts them at a fixed rate) over REST or gRPC for a while and reports
//! throughput, latency percentiles and — from the server's own `/metrics` — how requests were
//! batched and where the server's time went.
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;

use super::synthetic_history;
use crate::data::unix_now;
use crate::grpc::pb;
use crate::grpc::pb::recommender_client::RecommenderClient;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Recommend for random preloaded users.
    Recommend,
    /// A new event for a random user, then a recommendation for that user (the cache cannot help).
    Fresh,
    /// Only ingest: calls of `ingest_batch` new events for random users (the store's write path).
    Ingest,
}

/// The server under test: its REST base URL, and its gRPC address when the timed calls go over
/// gRPC (preloading, readiness and metrics always use REST).
#[derive(Clone)]
pub struct Target {
    base: Arc<str>,
    client: reqwest::Client,
    grpc: Option<RecommenderClient<tonic::transport::Channel>>,
}

/// One timed call, whatever the protocol.
enum Ask {
    /// (user, item, timestamp) triples.
    Events(Vec<(String, String, i64)>),
    Recommend {
        user: String,
        k: usize,
    },
}

/// How the server answered a call.
enum Answered {
    Ok,
    /// Refused by admission (429 / RESOURCE_EXHAUSTED).
    Shed,
    Refused(String),
}

impl Target {
    pub fn new(base: &str, max_connections: usize) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(max_connections)
            // Below the server's default --header-read-timeout-ms (10 s), after which it closes
            // an idle connection: a request sent on one as it closes failed ("error sending
            // request"), counted as the server's error in open-loop runs that left some idle.
            .pool_idle_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            base: base.trim_end_matches('/').into(),
            client,
            grpc: None,
        })
    }

    /// Sends the timed calls over gRPC to `addr` (host:port) from now on: one HTTP/2
    /// connection, every call a stream on it, as gRPC clients do.
    pub async fn over_grpc(mut self, addr: &str) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to gRPC at {addr}"))?;
        self.grpc = Some(RecommenderClient::new(channel));
        Ok(self)
    }

    async fn ask(&self, ask: &Ask) -> anyhow::Result<Answered> {
        let Some(grpc) = &self.grpc else {
            let (path, body) = match ask {
                Ask::Events(events) => {
                    let events: Vec<_> = events
                        .iter()
                        .map(|(user, item, at)| json!({"user_id": user, "item_id": item, "timestamp": at}))
                        .collect();
                    ("/v1/events", json!({ "events": events }))
                }
                Ask::Recommend { user, k } => ("/v1/recommend", json!({ "user_id": user, "k": k })),
            };
            return Ok(match self.send(path, &body).await? {
                (status, _) if status.is_success() => Answered::Ok,
                (reqwest::StatusCode::TOO_MANY_REQUESTS, _) => Answered::Shed,
                (status, text) => Answered::Refused(format!("{path}: HTTP {status}: {text}")),
            });
        };
        let mut grpc = grpc.clone();
        let outcome = match ask {
            Ask::Events(events) => {
                let events = events
                    .iter()
                    .map(|(user, item, at)| pb::Event {
                        user_id: user.clone(),
                        item_id: item.clone(),
                        timestamp: *at,
                        event_type: None,
                    })
                    .collect();
                grpc.ingest_events(pb::IngestEventsRequest { events }).await.map(drop)
            }
            Ask::Recommend { user, k } => {
                let request = pb::RecommendRequest {
                    user_id: user.clone(),
                    k: Some(*k as u32),
                    ..Default::default()
                };
                grpc.recommend(request).await.map(drop)
            }
        };
        Ok(match outcome {
            Ok(()) => Answered::Ok,
            Err(status) if status.code() == tonic::Code::ResourceExhausted => Answered::Shed,
            Err(status) => Answered::Refused(format!("gRPC {:?}: {}", status.code(), status.message())),
        })
    }

    /// Sends one call; any HTTP answer is `Ok` with its status (the body is read in full: that
    /// is part of what a client pays, and it frees the connection).
    async fn send(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<(reqwest::StatusCode, String)> {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.text().await?))
    }

    async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<()> {
        let (status, text) = self.send(path, body).await?;
        if !status.is_success() {
            bail!("{path}: HTTP {status}: {text}");
        }
        Ok(())
    }

    /// Polls `/health/ready` until the server has loaded and warmed up its model.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + timeout;
        loop {
            let ready = self.client.get(format!("{}/health/ready", self.base)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() >= until {
                bail!("{} was not ready within {timeout:?}", self.base);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every sample of the server's Prometheus exposition, keyed by name with labels.
    pub async fn metrics(&self) -> anyhow::Result<HashMap<String, f64>> {
        let text = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(parse_exposition(&text))
    }
}

fn parse_exposition(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Who the simulated clients are and what they ask.
#[derive(Clone)]
pub struct Workload {
    pub mode: Mode,
    pub users: usize,
    /// The served catalogue's ids, events pick from these.
    pub item_ids: Arc<[String]>,
    pub k: usize,
    /// Events per call in `Mode::Ingest`.
    pub ingest_batch: usize,
    pub seed: u64,
}

fn user_id(n: usize) -> String {
    format!("load-{n}")
}

#[derive(Debug, Clone, Serialize)]
pub struct PreloadReport {
    pub users: usize,
    pub events: usize,
    pub seconds: f64,
}

/// Gives `users` users `events_per_user` synthetic events each (items from `item_ids`, the last a
/// minute ago), `in_flight` calls at a time of at most `events_per_call` events.
pub async fn preload(
    target: &Target,
    workload: &Workload,
    events_per_user: usize,
    events_per_call: usize,
    in_flight: usize,
) -> anyhow::Result<PreloadReport> {
    let (users, seed) = (workload.users, workload.seed);
    let users_per_call = (events_per_call / events_per_user.max(1)).max(1);
    let calls = users.div_ceil(users_per_call);
    let next_call = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..in_flight.max(1))
        .map(|_| {
            let (target, next_call, item_ids) = (target.clone(), next_call.clone(), workload.item_ids.clone());
            tokio::spawn(async move {
                loop {
                    let call = next_call.fetch_add(1, Ordering::Relaxed);
                    if call >= calls {
                        return anyhow::Ok(());
                    }
                    let mut events = Vec::with_capacity(users_per_call * events_per_user);
                    for user in call * users_per_call..((call + 1) * users_per_call).min(users) {
                        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ user as u64);
                        let (items, timestamps) = synthetic_history(&mut rng, events_per_user, item_ids.len() + 1, 0);
                        // Shifted so that the newest event happened a minute ago.
                        let start = unix_now() - 60 - timestamps.last().copied().unwrap_or(0);
                        for (item, at) in items.iter().zip(&timestamps) {
                            events.push(json!({
                                "user_id": user_id(user),
                                "item_id": item_ids[*item as usize - 1],
                                "timestamp": start + at,
                            }));
                        }
                    }
                    // A history longer than one call allows goes in several calls.
                    for events in events.chunks(events_per_call.max(1)) {
                        target.post("/v1/events", &json!({ "events": events })).await?;
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    Ok(PreloadReport {
        users,
        events: users * events_per_user,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What the server reported about the same interval, from differences of its counters.
#[derive(Debug, Clone, Serialize)]
pub struct ServerBreakdown {
    /// Mean time from the recommend handler's start to its response, as the server saw it: what
    /// a client sees beyond this is HTTP, JSON and the client itself.
    pub mean_recommend_ms: f64,
    pub batches: f64,
    pub mean_batch_size: f64,
    /// (upper bound, batches of at most that size and more than the previous bound).
    pub batch_size_histogram: Vec<(String, f64)>,
    pub mean_queue_wait_ms: f64,
    /// Index batch in + encoder, per batch.
    pub mean_forward_ms: f64,
    /// Scores, masking, top-k and winners out, per batch.
    pub mean_rank_ms: f64,
    /// Share of the interval the inference worker spent in forward + rank.
    pub worker_busy_fraction: f64,
}

impl ServerBreakdown {
    fn between(before: &HashMap<String, f64>, after: &HashMap<String, f64>, seconds: f64) -> Self {
        let delta = |key: &str| after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0);
        let mean_ms = |name: &str, labels: &str| {
            1e3 * delta(&format!("{name}_sum{labels}")) / delta(&format!("{name}_count{labels}")).max(1.0)
        };
        let batches = delta("xsrec_batch_size_count");
        let mut buckets: Vec<(f64, String, f64)> = after
            .keys()
            .filter_map(|key| {
                let bound = key.strip_prefix("xsrec_batch_size_bucket{le=\"")?.strip_suffix("\"}")?;
                Some((bound.parse().unwrap_or(f64::INFINITY), bound.to_string(), delta(key)))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut below = 0.0;
        let batch_size_histogram = buckets
            .into_iter()
            .map(|(_, bound, cumulative)| {
                let count = cumulative - below;
                below = cumulative;
                (bound, count)
            })
            .collect();
        let busy = delta("xsrec_inference_duration_seconds_sum") + delta("xsrec_topk_duration_seconds_sum");
        Self {
            mean_recommend_ms: mean_ms("xsrec_request_duration_seconds", "{route=\"/v1/recommend\"}"),
            batches,
            mean_batch_size: delta("xsrec_batch_size_sum") / batches.max(1.0),
            batch_size_histogram,
            mean_queue_wait_ms: mean_ms("xsrec_queue_wait_seconds", ""),
            mean_forward_ms: mean_ms("xsrec_inference_duration_seconds", ""),
            mean_rank_ms: mean_ms("xsrec_topk_duration_seconds", ""),
            worker_busy_fraction: busy / seconds,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    pub mode: Mode,
    /// Clients in a closed loop, or the most calls outstanding at once in an open loop.
    pub concurrency: usize,
    /// Calls started per second in an open loop (`--rate`); None for a closed loop.
    pub offered_per_sec: Option<f64>,
    pub seconds: f64,
    /// Calls answered with 200: recommendations, or ingest calls in `Mode::Ingest`.
    pub requests: usize,
    /// Events stored per second (`Mode::Ingest`, else 0).
    pub events_per_sec: f64,
    /// Calls turned away with 429 (load shedding), and how fast that answer came.
    pub shed: usize,
    pub shed_p99_ms: f64,
    /// Open loop: calls not started because `concurrency` were already outstanding.
    pub not_sent: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub requests_per_sec: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub server: ServerBreakdown,
}

/// What became of one simulated client's call.
enum Outcome {
    Served(Duration),
    Shed(Duration),
    Failed(String),
}

/// One call of `workload` (for `Mode::Fresh` an event first, untimed), timed.
async fn call(target: &Target, workload: &Workload, rng: &mut ChaCha8Rng) -> Outcome {
    let users = workload.users.max(1);
    let user = user_id(rng.gen_range(0..users));
    let item_ids = &workload.item_ids;
    // An event of a random item for `user` happening now.
    let event =
        |rng: &mut ChaCha8Rng, user: String| (user, item_ids[rng.gen_range(0..item_ids.len())].clone(), unix_now());
    let ask = match workload.mode {
        Mode::Ingest => Ask::Events(
            (0..workload.ingest_batch.max(1))
                .map(|_| {
                    let user = user_id(rng.gen_range(0..users));
                    event(rng, user)
                })
                .collect(),
        ),
        Mode::Recommend | Mode::Fresh => {
            if workload.mode == Mode::Fresh {
                match target.ask(&Ask::Events(vec![event(rng, user.clone())])).await {
                    Ok(Answered::Ok) => {}
                    Ok(Answered::Shed) => return Outcome::Failed("the event was shed".into()),
                    Ok(Answered::Refused(why)) => return Outcome::Failed(why),
                    Err(e) => return Outcome::Failed(e.to_string()),
                }
            }
            Ask::Recommend { user, k: workload.k }
        }
    };
    let sent = Instant::now();
    match target.ask(&ask).await {
        Ok(Answered::Ok) => Outcome::Served(sent.elapsed()),
        Ok(Answered::Shed) => Outcome::Shed(sent.elapsed()),
        Ok(Answered::Refused(why)) => Outcome::Failed(why),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Outcomes of a level, gathered from its clients.
#[derive(Default)]
struct Tally {
    served_us: Vec<u64>,
    shed_us: Vec<u64>,
    errors: usize,
    first_error: Option<String>,
}

impl Tally {
    fn add(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Served(latency) => self.served_us.push(latency.as_micros() as u64),
            Outcome::Shed(latency) => self.shed_us.push(latency.as_micros() as u64),
            Outcome::Failed(error) => {
                self.errors += 1;
                self.first_error.get_or_insert(error);
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.served_us.extend(other.served_us);
        self.shed_us.extend(other.shed_us);
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
    }
}

/// Milliseconds at quantile `p` of microsecond samples, sorted here.
fn quantile_ms(samples: &mut [u64], p: f64) -> f64 {
    samples.sort_unstable();
    samples
        .get(((samples.len() as f64 * p) as usize).min(samples.len().saturating_sub(1)))
        .map_or(0.0, |&us| us as f64 / 1e3)
}

/// Keeps `concurrency` clients busy for `duration` (a closed loop: each sends its next call
/// when the last is answered); latency is that of the recommend call (of the ingest call in
/// `Mode::Ingest`).
pub async fn run_level(
    target: &Target,
    workload: &Workload,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<LevelReport> {
    let before = target.metrics().await.context("reading /metrics before the run")?;
    let started = Instant::now();
    let until = started + duration;
    let clients: Vec<_> = (0..concurrency.max(1))
        .map(|client| {
            let (target, workload) = (target.clone(), workload.clone());
            tokio::spawn(async move {
                let mut rng = ChaCha8Rng::seed_from_u64(workload.seed ^ (client as u64) << 32);
                let mut tally = Tally::default();
                while Instant::now() < until {
                    tally.add(call(&target, &workload, &mut rng).await);
                }
                tally
            })
        })
        .collect();
    let mut tally = Tally::default();
    for client in clients {
        tally.merge(client.await?);
    }
    report(target, workload, concurrency, None, 0, started, &before, tally).await
}

/// Starts calls at `rate` per second for `duration` whether or not earlier ones are answered
/// (an open loop, as independent users arrive), with at most `max_outstanding` in flight: the
/// way to offer a server more than it can take and see what it does with the excess.
pub async fn run_rate(
    target: &Target,
    workload: &Workload,
    rate: f64,
    max_outstanding: usize,
    duration: Duration,
) -> anyhow::Result<LevelReport> {
    let before = target.metrics().await.context("reading /metrics before the run")?;
    let outstanding = Arc::new(tokio::sync::Semaphore::new(max_outstanding.max(1)));
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let mut rng = ChaCha8Rng::seed_from_u64(workload.seed);
    let (mut started_calls, mut not_sent) = (0u64, 0usize);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while started_calls < due {
            started_calls += 1;
            let Ok(permit) = outstanding.clone().try_acquire_owned() else {
                not_sent += 1;
                continue;
            };
            let (target, workload, done) = (target.clone(), workload.clone(), done_tx.clone());
            let mut call_rng = ChaCha8Rng::seed_from_u64(rng.gen());
            tokio::spawn(async move {
                let outcome = call(&target, &workload, &mut call_rng).await;
                drop(permit);
                let _ = done.send(outcome);
            });
        }
    }
    drop(done_tx);
    let mut tally = Tally::default();
    while let Some(outcome) = done.recv().await {
        tally.add(outcome);
    }
    report(
        target,
        workload,
        max_outstanding,
        Some(rate),
        not_sent,
        started,
        &before,
        tally,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn report(
    target: &Target,
    workload: &Workload,
    concurrency: usize,
    offered_per_sec: Option<f64>,
    not_sent: usize,
    started: Instant,
    before: &HashMap<String, f64>,
    mut tally: Tally,
) -> anyhow::Result<LevelReport> {
    let seconds = started.elapsed().as_secs_f64();
    let after = target.metrics().await.context("reading /metrics after the run")?;
    let requests = tally.served_us.len();
    let mean_ms = tally.served_us.iter().sum::<u64>() as f64 / requests.max(1) as f64 / 1e3;
    let served = &mut tally.served_us;
    Ok(LevelReport {
        mode: workload.mode,
        concurrency,
        offered_per_sec,
        seconds,
        requests,
        events_per_sec: match workload.mode {
            Mode::Ingest => (requests * workload.ingest_batch.max(1)) as f64 / seconds,
            _ => 0.0,
        },
        shed: tally.shed_us.len(),
        shed_p99_ms: quantile_ms(&mut tally.shed_us, 0.99),
        not_sent,
        errors: tally.errors,
        first_error: tally.first_error,
        requests_per_sec: requests as f64 / seconds,
        mean_ms,
        p50_ms: quantile_ms(served, 0.50),
        p90_ms: quantile_ms(served, 0.90),
        p99_ms: quantile_ms(served, 0.99),
        max_ms: quantile_ms(served, 1.0),
        server: ServerBreakdown::between(before, &after, seconds),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakdown_differences_counters_and_uncumulates_buckets() {
        let before = parse_exposition(
            "# HELP x\nxsrec_batch_size_bucket{le=\"1\"} 2\nxsrec_batch_size_bucket{le=\"+Inf\"} 3\n\
             xsrec_batch_size_sum 5\nxsrec_batch_size_count 3\n",
        );
        let after = parse_exposition(
            "xsrec_batch_size_bucket{le=\"1\"} 4\nxsrec_batch_size_bucket{le=\"+Inf\"} 8\n\
             xsrec_batch_size_sum 25\nxsrec_batch_size_count 8\n\
             xsrec_inference_duration_seconds_sum 0.5\nxsrec_inference_duration_seconds_count 5\n\
             xsrec_request_duration_seconds_sum{route=\"/v1/recommend\"} 0.3\n\
             xsrec_request_duration_seconds_count{route=\"/v1/recommend\"} 100\n",
        );
        let found = ServerBreakdown::between(&before, &after, 2.0);
        assert_eq!(found.batches, 5.0);
        assert_eq!(found.mean_batch_size, 4.0);
        assert_eq!(
            found.batch_size_histogram,
            vec![("1".into(), 2.0), ("+Inf".into(), 3.0)]
        );
        assert!((found.mean_forward_ms - 100.0).abs() < 1e-9);
        assert!((found.worker_busy_fraction - 0.25).abs() < 1e-9);
        assert!((found.mean_recommend_ms - 3.0).abs() < 1e-9);
    }
}
