//! The inference worker: the one thread that owns the model and runs libtorch for whole batches.
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;

use super::batcher::Batcher;
use super::rank::{top_k, Catalogue, Retrieval};
use super::{Answer, Control, InferError, InferRequest, ModelSlot, Query};
use crate::data::formats::category_names;
use crate::data::session::hour_of_week;
use crate::health::Health;
use crate::history::HistorySnapshot;
use crate::metrics::Metrics;
use crate::model::input::moment_key;
use crate::model::input::{to_device_pinned, to_host_f32};
use crate::model::net::add_to_items;
use crate::model::{
    encode, encode_window, fresh_window_start, padded_index, Artifact, Batch, HistoryView, Precision, PrefixPool,
    SeqModel, Slot, SHORT_APPEND,
};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub device: Device,
    /// Users whose final hidden state is kept; 0 turns the cache off.
    pub cache_capacity: usize,
    /// Bytes of keys and values kept for incremental inference (models that can append), and
    /// their storage precision (the model's when `None`).
    pub prefix_bytes: usize,
    pub prefix_precision: Option<Precision>,
    /// How the host ranks the catalogue.
    pub retrieval: Retrieval,
    /// Batch sizes run once at start so that no request pays for first-use set-up.
    pub warmup_batch_sizes: Vec<usize>,
    /// The longest a request can wait for its batch: how long an erasure must be remembered.
    pub max_request_age: Duration,
}

/// Batches failing in a row before the worker declares itself broken (readiness off, the server
/// exits non-zero for its orchestrator to restart it). One failure is treated as a bad batch:
/// its requests get `inference_failed`, the cache is dropped, and serving goes on.
pub const MAX_CONSECUTIVE_FAILURES: u32 = 3;

/// What the worker keeps of a user, for one model: the final hidden state, valid while the
/// history version and the moment key match (a hit costs no forward pass); and where the model
/// can append, a slot of the model's prefix pool with the keys and values of every position
/// but the newest, so that a changed history costs only the positions after them.
struct CachedState {
    model: u64,
    version: u64,
    bucket: i64,
    /// The state before the clock readout ([`SeqModel::last_state`]), on the host (f32, which
    /// holds a bf16 model's state exactly): a batch's hits and misses are then assembled into
    /// one tensor with one copy, not one op per row.
    hidden: Vec<f32>,
    /// Where the window it was computed on starts in the history (the clock readout reads the
    /// same window).
    window_start: usize,
    /// With a clock readout: the final state for one hour of the week (`hidden` with that
    /// hour's readout), so that later requests in the same hour need no readout.
    clocked: Option<(i64, Vec<f32>)>,
    prefix: Option<CachedPrefix>,
    last_used: u64,
}

impl CachedState {
    fn hidden_bytes(&self) -> usize {
        let clocked = self.clocked.as_ref().map_or(0, |(_, hidden)| hidden.len());
        (self.hidden.len() + clocked) * std::mem::size_of::<f32>()
    }
}

/// The users' states and, per model that can append, the pool their prefixes live in. Every
/// state that leaves the cache returns its slot, except one [`Self::take`]n for computing.
#[derive(Default)]
struct StateCache {
    states: HashMap<Arc<str>, CachedState>,
    pools: HashMap<u64, PrefixPool>,
    hidden_bytes: usize,
}

impl StateCache {
    fn get_mut(&mut self, user: &str) -> Option<&mut CachedState> {
        self.states.get_mut(user)
    }

    fn insert(&mut self, user: Arc<str>, state: CachedState) {
        self.hidden_bytes += state.hidden_bytes();
        if let Some(old) = self.states.insert(user, state) {
            self.discard(old);
        }
    }

    /// The user's state, out of the cache, its slot (if any) now the caller's.
    fn take(&mut self, user: &str) -> Option<CachedState> {
        let state = self.states.remove(user)?;
        self.hidden_bytes -= state.hidden_bytes();
        Some(state)
    }

    fn remove(&mut self, user: &str) {
        if let Some(state) = self.take(user) {
            self.release(state.model, state.prefix);
        }
    }

    fn discard(&mut self, state: CachedState) {
        self.hidden_bytes -= state.hidden_bytes();
        self.release(state.model, state.prefix);
    }

    /// Returns a slot that no state holds any more to its pool.
    fn release(&mut self, model: u64, prefix: Option<CachedPrefix>) {
        if let (Some(prefix), Some(pool)) = (prefix, self.pools.get_mut(&model)) {
            pool.release(prefix.slot);
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&CachedState) -> bool) {
        let dropped: Vec<Arc<str>> = self
            .states
            .iter()
            .filter(|(_, state)| !keep(state))
            .map(|(user, _)| user.clone())
            .collect();
        for user in dropped {
            self.remove(&user);
        }
    }

    fn clear(&mut self) {
        self.states.clear();
        self.hidden_bytes = 0;
        self.pools.values_mut().for_each(PrefixPool::clear);
    }

    /// A free slot of `model`'s pool, evicting the least recently used eighth of the states
    /// that hold one when the pool is full; `None` when the model cannot append or the pool
    /// has no slot to give (all held by the batch being computed). Returns the evictions too.
    fn allocate(&mut self, model: u64) -> (Option<Slot>, usize) {
        let pool = match self.pools.get_mut(&model) {
            Some(pool) => pool,
            None => return (None, 0),
        };
        if let Some(slot) = pool.allocate() {
            return (Some(slot), 0);
        }
        let mut holders: Vec<(u64, Arc<str>)> = self
            .states
            .iter()
            .filter(|(_, state)| state.model == model && state.prefix.is_some())
            .map(|(user, state)| (state.last_used, user.clone()))
            .collect();
        let evicted = holders.len().div_ceil(8);
        if evicted > 0 {
            holders.select_nth_unstable(evicted - 1);
        }
        for (_, user) in holders.into_iter().take(evicted) {
            self.remove(&user);
        }
        let slot = self.pools.get_mut(&model).and_then(PrefixPool::allocate);
        (slot, evicted)
    }

    fn pool(&mut self, model: u64) -> Option<&mut PrefixPool> {
        self.pools.get_mut(&model)
    }

    /// The pool of a model that has handed out slots.
    fn pool_of(&mut self, model: u64) -> &mut PrefixPool {
        self.pool(model).expect("slots come from their model's pool")
    }

    /// Bytes held: hidden states and the pools' slots in use.
    fn bytes(&self) -> usize {
        self.hidden_bytes + self.pools.values().map(PrefixPool::bytes_in_use).sum::<usize>()
    }

    fn len(&self) -> usize {
        self.states.len()
    }

    fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    fn last_used(&self) -> Vec<u64> {
        self.states.values().map(|s| s.last_used).collect()
    }
}

/// A slot of keys and values of a window's first positions, with the events their inputs read.
struct CachedPrefix {
    covered: CoveredEvents,
    slot: Slot,
}

/// What the inputs of a window's first positions read: their events, the time of the event
/// before the window (the first position's gap) and of the event after them (the moment the
/// last of them predicts).
#[derive(Debug)]
struct CoveredEvents {
    previous_timestamp: Option<i64>,
    items: Vec<u32>,
    timestamps: Vec<i64>,
    types: Vec<u32>,
    next_timestamp: i64,
}

impl CoveredEvents {
    /// Positions `start..end` of `history` (with an event after them).
    fn new(history: &HistorySnapshot, start: usize, end: usize) -> Self {
        Self {
            previous_timestamp: start.checked_sub(1).map(|i| history.timestamps[i]),
            items: history.items[start..end].to_vec(),
            timestamps: history.timestamps[start..end].to_vec(),
            types: history.types[start..end].to_vec(),
            next_timestamp: history.timestamps[end],
        }
    }

    /// Where `history`'s window starts if these are still its first positions: the same
    /// events in one piece, between the same neighbours' times, with at least one event after
    /// them and at most `max_len` from the start on. Events inserted out of order, erased or
    /// dropped from the front where the positions' inputs read them make it `None`.
    fn window_start(&self, history: &HistorySnapshot, max_len: usize) -> Option<usize> {
        let first = *self.timestamps.first()?;
        let covered = self.items.len();
        let len = history.items.len();
        let from = history.timestamps.partition_point(|&t| t < first);
        (from..len)
            .take_while(|&start| history.timestamps[start] == first)
            .find(|&start| {
                let end = start + covered;
                end < len
                    && len - start <= max_len
                    && history.timestamps[end] == self.next_timestamp
                    && start.checked_sub(1).map(|i| history.timestamps[i]) == self.previous_timestamp
                    && history.items[start..end] == self.items[..]
                    && history.timestamps[start..end] == self.timestamps[..]
                    && history.types[start..end] == self.types[..]
            })
    }
}

/// A model as the worker runs it.
pub struct ServingModel {
    model: SeqModel,
    /// `[V, C]`: each item's probability mass split evenly over its categories.
    categories: Option<Tensor>,
    catalogue: Catalogue,
}

impl ServingModel {
    pub fn new(artifact: Artifact, device: Device, retrieval: Retrieval) -> Self {
        Self {
            categories: category_matrix(&artifact.item_categories, device),
            catalogue: Catalogue::new(artifact.model.net.item_table(), retrieval),
            model: artifact.model,
        }
    }

    /// Runs each batch size once, so that no request pays for first-use set-up.
    pub fn warm_up(&self, batch_sizes: &[usize], device: Device) {
        let max_len = self.model.config.max_len;
        let (items, timestamps, types) = (
            vec![1u32; max_len],
            (0..max_len as i64).collect::<Vec<_>>(),
            vec![1u32; max_len],
        );
        let row = encode(
            HistoryView::new(&items, &timestamps, &types),
            max_len as i64,
            max_len,
            1,
        );
        for &size in batch_sizes {
            let hidden = self.model.last_hidden(&Batch::new(&vec![row.clone(); size], device));
            let _ = self.catalogue.rank(&hidden, &vec![Vec::new(); size], &vec![10; size]);
        }
    }
}

/// A model the worker holds, while someone holds its slot.
struct HeldModel {
    slot: Weak<ModelSlot>,
    number: u64,
    model: Rc<ServingModel>,
}

pub struct InferenceWorker {
    /// Newest last. Usually one; two while requests admitted before a reload are in flight.
    models: Vec<HeldModel>,
    cache: StateCache,
    config: WorkerConfig,
    tick: u64,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Recently erased users: (erasure version, when). States computed from an older history of
    /// theirs must not enter the cache.
    forgotten: HashMap<Arc<str>, (u64, Instant)>,
    consecutive_failures: u32,
}

impl InferenceWorker {
    pub fn spawn(
        (slot, artifact): (Weak<ModelSlot>, Artifact),
        config: WorkerConfig,
        batcher: Batcher,
        ready: oneshot::Sender<()>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) {
        std::thread::Builder::new()
            .name("inference-worker".into())
            .spawn(move || {
                let worker_health = health.clone();
                let outcome = catch_unwind(AssertUnwindSafe(move || {
                    let model = ServingModel::new(artifact, config.device, config.retrieval);
                    tch::no_grad(|| model.warm_up(&config.warmup_batch_sizes, config.device));
                    let mut worker = Self::new(config, metrics, worker_health);
                    worker.install(slot, model);
                    let _ = ready.send(());
                    worker.run(batcher);
                }));
                if let Err(panic) = outcome {
                    health.fail(format!(
                        "the inference worker died: {}",
                        crate::threads::panic_message(&*panic)
                    ));
                }
            })
            .expect("spawn inference worker");
    }

    fn new(config: WorkerConfig, metrics: Arc<Metrics>, health: Arc<Health>) -> Self {
        Self {
            models: Vec::new(),
            cache: StateCache::default(),
            config,
            tick: 0,
            metrics,
            health,
            forgotten: HashMap::new(),
            consecutive_failures: 0,
        }
    }

    fn install(&mut self, slot: Weak<ModelSlot>, model: ServingModel) {
        let number = slot.upgrade().map_or(0, |slot| slot.number());
        let net = &model.model.net;
        let storage = self
            .config
            .prefix_precision
            .map_or(net.item_table().kind(), Precision::kind);
        let budget = if self.config.cache_capacity > 0 {
            self.config.prefix_bytes
        } else {
            0
        };
        if let Some(pool) = net.prefix_pool(budget, storage) {
            tracing::info!(
                "incremental inference: {} keys and values per user ({:?}), room for {} users in {} MiB",
                pool.slot_bytes(),
                storage,
                pool.capacity(),
                budget >> 20
            );
            self.cache.pools.insert(number, pool);
        }
        tracing::info!("ranking {} items: {}", net.item_table().size()[0] - 1, model.catalogue);
        self.models.push(HeldModel {
            slot,
            number,
            model: Rc::new(model),
        });
        self.report_ranking_bytes();
    }

    fn report_ranking_bytes(&self) {
        let bytes: usize = self.models.iter().map(|held| held.model.catalogue.extra_bytes()).sum();
        self.metrics.ranking_bytes.set(bytes as i64);
    }

    fn control(&mut self, command: Control) {
        match command {
            Control::Forget { user, erased_at } => self.forget(user, erased_at),
            Control::Install { slot, model, installed } => {
                self.install(slot, *model);
                let _ = installed.send(());
            }
        }
    }

    /// Drops the models nobody can ask for any more (their slot is gone: the core serves a newer
    /// one and no request of theirs is left), and the states cached from them.
    fn retire_unused_models(&mut self) {
        let before = self.models.len();
        self.models.retain(|held| held.slot.strong_count() > 0);
        if self.models.len() < before {
            let live: Vec<u64> = self.models.iter().map(|held| held.number).collect();
            self.cache.retain(|state| live.contains(&state.model));
            self.cache.pools.retain(|model, _| live.contains(model));
            self.report_ranking_bytes();
        }
    }

    /// Runs batches until the engine is gone and its queue is empty.
    fn run(&mut self, mut batcher: Batcher) {
        while let Some(batch) = batcher.next_batch(|command| self.control(command)) {
            tch::no_grad(|| self.execute(batch));
            self.retire_unused_models();
            self.metrics.cached_states.set(self.cache.len() as i64);
            self.metrics.cached_bytes.set(self.cache.bytes() as i64);
        }
    }

    fn execute(&mut self, batch: Vec<InferRequest>) {
        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        for request in batch {
            self.metrics
                .queue_wait
                .observe(now.duration_since(request.enqueued).as_secs_f64());
            if request.reply.is_closed() {
                continue; // the caller has gone: nobody wants this answer
            }
            if request.deadline <= now {
                let _ = request.reply.send(Err(InferError::DeadlineExceeded));
                continue;
            }
            live.push(request);
        }
        // One forward pass per model: a batch spans two only around a reload.
        while !live.is_empty() {
            let number = live[0].model.number();
            let (group, rest) = live.into_iter().partition(|r| r.model.number() == number);
            live = rest;
            match self.models.iter().find(|held| held.number == number) {
                Some(held) => {
                    let model = held.model.clone();
                    self.execute_on(&model, number, group);
                }
                // Cannot happen: a slot is handed out only once its model is installed.
                None => self.fail_batch(group, "its model is not loaded"),
            }
        }
    }

    fn execute_on(&mut self, model: &ServingModel, number: u64, live: Vec<InferRequest>) {
        self.metrics.batch_size.observe(live.len() as f64);
        self.metrics.executions.inc();
        self.metrics.inferences.inc_by(live.len() as u64);
        // libtorch reports errors as panics through tch; one bad batch must not take the thread.
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            fail::fail_point!("inference-batch");
            let started = Instant::now();
            let hidden = self.hidden_states(model, number, &live);
            self.metrics.inference_duration.observe(started.elapsed().as_secs_f64());
            let started = Instant::now();
            let answers = answer(model, &live, &hidden);
            self.metrics.topk_duration.observe(started.elapsed().as_secs_f64());
            answers
        }));
        match outcome {
            Ok(answers) => {
                self.consecutive_failures = 0;
                for (request, answer) in live.into_iter().zip(answers) {
                    let _ = request.reply.send(Ok(answer));
                }
            }
            Err(panic) => self.fail_batch(live, &crate::threads::panic_message(&*panic)),
        }
    }

    fn fail_batch(&mut self, live: Vec<InferRequest>, message: &str) {
        self.consecutive_failures += 1;
        self.metrics.worker_failures.inc();
        // A half-finished batch may have left states behind that nothing vouches for.
        self.cache.clear();
        tracing::error!(
            "inference batch of {} failed ({} in a row): {message}",
            live.len(),
            self.consecutive_failures
        );
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES {
            self.health.fail(format!(
                "the inference worker failed {} batches in a row, last: {message}",
                self.consecutive_failures
            ));
        }
        for request in live {
            let _ = request
                .reply
                .send(Err(InferError::Failed(format!("the batch failed: {message}"))));
        }
    }

    fn forget(&mut self, user: Arc<str>, erased_at: u64) {
        self.cache.remove(&user);
        self.metrics.cached_states.set(self.cache.len() as i64);
        let now = Instant::now();
        let horizon = self.config.max_request_age;
        self.forgotten
            .retain(|_, (_, when)| now.duration_since(*when) <= horizon);
        self.forgotten.insert(user, (erased_at, now));
    }

    /// Whether a state computed from `request`'s history may be cached: not when the user was
    /// erased after that history was read.
    fn cacheable(&self, request: &InferRequest) -> bool {
        self.forgotten
            .get(&request.user)
            .is_none_or(|&(erased_at, _)| request.history.version > erased_at)
    }

    /// What besides the history version a cached state depends on (see [`moment_key`]).
    fn cache_bucket(model: &ServingModel, request: &InferRequest) -> i64 {
        let (h, config) = (&request.history, &model.model.config);
        let view = HistoryView::new(&h.items, &h.timestamps, &h.types);
        moment_key(view, request.at, &config.features, config.session_gap_secs)
    }

    /// `[B, d]` final hidden states: the states before the clock readout cached where still
    /// valid, computed from the user's cached keys and values where the model can append, one
    /// full forward pass for the rest; then the clock readout of each row's moment, unless the
    /// cache holds it for that hour.
    fn hidden_states(&mut self, model: &ServingModel, number: u64, requests: &[InferRequest]) -> Tensor {
        self.tick += 1;
        let caching = self.config.cache_capacity > 0;
        let max_len = model.model.config.max_len;
        let width = model.model.net.item_table().size()[1] as usize;
        let mut rows = vec![0f32; requests.len() * width];
        let mut filled = 0;
        let buckets: Vec<i64> = requests.iter().map(|r| Self::cache_bucket(model, r)).collect();
        let (mut full, mut appends, mut evicted) = (Vec::new(), Vec::new(), 0);
        let clock = model.model.config.features.clock_readout;
        let hours: Vec<i64> = requests.iter().map(|r| hour_of_week(r.at)).collect();
        // Rows still without their clock readout.
        let mut unclocked = Vec::new();
        // Where each row's window starts.
        let mut window_starts: Vec<usize> = requests
            .iter()
            .map(|r| r.history.items.len().saturating_sub(max_len))
            .collect();
        for (i, (request, &bucket)) in requests.iter().zip(&buckets).enumerate() {
            if let Some(state) = self.cache.get_mut(&request.user).filter(|_| caching) {
                if state.model == number && state.version == request.history.version && state.bucket == bucket {
                    state.last_used = self.tick;
                    let row = &mut rows[i * width..(i + 1) * width];
                    match &state.clocked {
                        Some((hour, hidden)) if clock && *hour == hours[i] => row.copy_from_slice(hidden),
                        _ => {
                            row.copy_from_slice(&state.hidden);
                            unclocked.extend(clock.then_some(i));
                        }
                    }
                    window_starts[i] = state.window_start;
                    filled += 1;
                    continue;
                }
            }
            // Taken out of the cache: the state is replaced once this request is computed.
            unclocked.extend(clock.then_some(i));
            let history = &request.history;
            let fresh_start = fresh_window_start(history.items.len(), max_len);
            let reused = match self.cache.take(&request.user) {
                Some(state) if state.model == number => {
                    state
                        .prefix
                        .map(|prefix| match prefix.covered.window_start(history, max_len) {
                            Some(start) => (start, prefix.slot),
                            None => {
                                self.cache.pool_of(number).truncate(&prefix.slot, 0);
                                (fresh_start, prefix.slot)
                            }
                        })
                }
                Some(stale) => {
                    self.cache.release(stale.model, stale.prefix);
                    None
                }
                None => None,
            };
            let slot = reused.or_else(|| {
                let (slot, evictions) = self.cache.allocate(number);
                evicted += evictions;
                slot.map(|slot| (fresh_start, slot))
            });
            match slot {
                Some((start, slot)) => {
                    window_starts[i] = start;
                    appends.push((i, start, slot));
                }
                None => full.push(i),
            }
        }
        let misses = full.len() + appends.len();
        self.metrics.cache_hits.inc_by((requests.len() - misses) as u64);
        self.metrics.cache_misses.inc_by(misses as u64);
        self.metrics.cache_evictions.inc_by(evicted as u64);
        if let Some(pool) = self.cache.pool(number) {
            let extended = appends.iter().filter(|(_, _, slot)| pool.len(slot) > 0).count();
            self.metrics.cache_appends.inc_by(extended as u64);
        }
        if caching {
            self.make_room(misses);
        }
        let config = &model.model.config;
        let encoded = |i: usize, start: usize| {
            let h = &requests[i].history;
            let view = HistoryView::new(&h.items, &h.timestamps, &h.types);
            encode_window(view, start, requests[i].at, config.max_len, config.session_gap_secs)
        };
        if !full.is_empty() {
            let rows_in = full.iter().map(|&i| encoded(i, window_starts[i])).collect::<Vec<_>>();
            let hidden = to_host_f32(&model.model.last_state(&Batch::trimmed(&rows_in, self.config.device)));
            for (&i, row) in full.iter().zip(hidden.chunks(width)) {
                self.keep(&requests[i], number, buckets[i], row, window_starts[i], None);
                rows[i * width..(i + 1) * width].copy_from_slice(row);
                filled += 1;
            }
        }
        let (short, long): (Vec<_>, Vec<_>) = appends.into_iter().partition(|(i, start, slot)| {
            let held = self.cache.pool_of(number).len(slot);
            requests[*i].history.items.len() - start - held <= SHORT_APPEND
        });
        for group in [short, long].into_iter().filter(|group| !group.is_empty()) {
            let rows_in = group.iter().map(|&(i, start, _)| encoded(i, start)).collect::<Vec<_>>();
            let slots: Vec<&Slot> = group.iter().map(|(_, _, slot)| slot).collect();
            let batch = Batch::trimmed(&rows_in, self.config.device);
            let hidden = model
                .model
                .extend_last_state(&batch, self.cache.pool_of(number), &slots)
                .expect("an appendable model");
            let hidden = to_host_f32(&hidden);
            for ((i, start, slot), row) in group.into_iter().zip(hidden.chunks(width)) {
                let held = self.cache.pool_of(number).len(&slot);
                let covered = CoveredEvents::new(&requests[i].history, start, start + held);
                self.keep(
                    &requests[i],
                    number,
                    buckets[i],
                    row,
                    start,
                    Some(CachedPrefix { covered, slot }),
                );
                rows[i * width..(i + 1) * width].copy_from_slice(row);
                filled += 1;
            }
        }
        assert_eq!(filled, requests.len(), "every row filled");
        if !unclocked.is_empty() {
            let states: Vec<f32> = unclocked
                .iter()
                .flat_map(|&i| &rows[i * width..(i + 1) * width])
                .copied()
                .collect();
            let states = Tensor::from_slice(&states).view([unclocked.len() as i64, width as i64]);
            let rows_in: Vec<_> = unclocked.iter().map(|&i| encoded(i, window_starts[i])).collect();
            let batch = Batch::trimmed(&rows_in, self.config.device);
            let states = to_device_pinned(states, self.config.device);
            let clocked = to_host_f32(&model.model.read_clock(states, &batch));
            for (&i, row) in unclocked.iter().zip(clocked.chunks(width)) {
                rows[i * width..(i + 1) * width].copy_from_slice(row);
                let request = &requests[i];
                if let Some(state) = self.cache.get_mut(&request.user) {
                    if state.model == number && state.version == request.history.version && state.bucket == buckets[i] {
                        state.clocked = Some((hours[i], row.to_vec()));
                    }
                }
            }
        }
        let rows = Tensor::from_slice(&rows).view([requests.len() as i64, width as i64]);
        to_device_pinned(rows, self.config.device).to_kind(model.model.net.item_table().kind())
    }

    /// Caches what was computed for `request`, unless caching is off or the user was erased
    /// after its history was read.
    fn keep(
        &mut self,
        request: &InferRequest,
        model: u64,
        bucket: i64,
        hidden: &[f32],
        window_start: usize,
        prefix: Option<CachedPrefix>,
    ) {
        if self.config.cache_capacity == 0 || !self.cacheable(request) {
            self.cache.release(model, prefix);
            return;
        }
        let state = CachedState {
            model,
            version: request.history.version,
            bucket,
            hidden: hidden.to_vec(),
            window_start,
            clocked: None,
            prefix,
            last_used: self.tick,
        };
        self.cache.insert(request.user.clone(), state);
    }

    /// Keeps the cache within capacity by dropping the least recently used half when full.
    fn make_room(&mut self, incoming: usize) {
        if self.cache.is_empty() || self.cache.len() + incoming <= self.config.cache_capacity {
            return;
        }
        let mut ticks = self.cache.last_used();
        let middle = ticks.len() / 2;
        let (_, &mut cutoff, _) = ticks.select_nth_unstable(middle);
        let before = self.cache.len();
        self.cache.retain(|state| state.last_used > cutoff);
        self.metrics.cache_evictions.inc_by((before - self.cache.len()) as u64);
    }
}

fn answer(model: &ServingModel, requests: &[InferRequest], hidden: &Tensor) -> Vec<Answer> {
    let net = &model.model.net;
    let device = hidden.device();
    let mut answers: Vec<Option<Answer>> = vec![None; requests.len()];
    let group = |keep: fn(&Query) -> bool| -> Vec<usize> {
        requests
            .iter()
            .enumerate()
            .filter(|(_, r)| keep(&r.query))
            .map(|(i, _)| i)
            .collect()
    };
    let select = |all: &Tensor, indices: &[usize]| {
        if indices.len() == requests.len() {
            return all.shallow_clone(); // one kind of query in the batch: the usual case
        }
        let index: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        all.index_select(0, &to_device_pinned(Tensor::from_slice(&index), device))
    };
    // With a repeat term: its offset per row. Both it and leaving seen items out need the
    // distinct items of each row's history (the items that left memory for the cap too:
    // training raises every item before the position), computed once per request.
    let repeat_offsets = net.repeat_offsets(hidden);
    let held: Vec<Vec<i64>> = requests
        .iter()
        .map(|request| {
            let excludes = matches!(request.query, Query::TopK { exclude_seen: true, .. });
            match repeat_offsets.is_some() || excludes {
                true => request.history.had_items(),
                false => Vec::new(),
            }
        })
        .collect();
    let repeats_of = |indices: &[usize]| {
        repeat_offsets.as_ref().map(|offsets| Repeats {
            offsets: select(offsets, indices),
            held: indices.iter().map(|&i| held[i].as_slice()).collect(),
        })
    };

    let ranking = group(|q| matches!(q, Query::TopK { .. }));
    if !ranking.is_empty() {
        let nothing = Vec::new();
        let excluded: Vec<&Vec<i64>> = ranking
            .iter()
            .map(|&i| match &requests[i].query {
                Query::TopK { exclude_seen: true, .. } => &held[i],
                Query::TopK { .. } => &nothing,
                _ => unreachable!(),
            })
            .collect();
        let ks: Vec<usize> = ranking.iter().map(|&i| query_k(&requests[i].query)).collect();
        let rows = select(hidden, &ranking);
        let ranked = match repeats_of(&ranking) {
            None => model.catalogue.rank(&rows, &excluded, &ks),
            Some(repeats) => rank_with_repeats(model, &rows, &excluded, &ks, &repeats),
        };
        for (slot, ranked) in ranking.iter().zip(ranked) {
            answers[*slot] = Some(Answer::Items(ranked));
        }
    }

    let candidate_rows = group(|q| matches!(q, Query::Candidates { .. }));
    if !candidate_rows.is_empty() {
        let lists: Vec<&Vec<i64>> = candidate_rows
            .iter()
            .map(|&i| match &requests[i].query {
                Query::Candidates { candidates, .. } => candidates,
                _ => unreachable!(),
            })
            .collect();
        let rows = select(hidden, &candidate_rows);
        let (scores, index) = listed_scores(
            net.item_table(),
            &rows,
            &lists,
            repeats_of(&candidate_rows).as_ref(),
            model.catalogue.score_kind(),
        );
        let ks: Vec<usize> = candidate_rows.iter().map(|&i| query_k(&requests[i].query)).collect();
        for (slot, ranked) in candidate_rows.iter().zip(top_k(&scores, &ks, Some(&index))) {
            answers[*slot] = Some(Answer::Items(ranked));
        }
    }

    let interest_rows = group(|q| matches!(q, Query::Interests { .. }));
    if let (false, Some(categories)) = (interest_rows.is_empty(), &model.categories) {
        let rows = select(hidden, &interest_rows);
        let logits = match repeats_of(&interest_rows) {
            Some(repeats) => add_to_items(net.score(&rows), &padded_index(&repeats.held, device), &repeats.offsets),
            None => net.score(&rows),
        };
        let _ = logits.narrow(1, 0, 1).fill_(f64::NEG_INFINITY); // the padding item
        let mass = logits.softmax(-1, Kind::Float).matmul(categories);
        let ks: Vec<usize> = interest_rows.iter().map(|&i| query_k(&requests[i].query)).collect();
        for (slot, ranked) in interest_rows.iter().zip(top_k(&mass, &ks, None)) {
            answers[*slot] = Some(Answer::Categories(
                ranked.into_iter().map(|(c, m)| (c as usize, m)).collect(),
            ));
        }
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or(Answer::Categories(Vec::new())))
        .collect()
}

/// The best `ks[row]` items for each of the `[B, d]` hidden `rows` but its `excluded` ones, with
/// the repeat term: the catalogue ranks the items the user never had, those they had (and may
/// get) are scored exactly with their offset, and the two lists are merged.
fn rank_with_repeats(
    model: &ServingModel,
    rows: &Tensor,
    excluded: &[&Vec<i64>],
    ks: &[usize],
    repeats: &Repeats,
) -> Vec<Vec<(u32, f32)>> {
    let allowed_held: Vec<Vec<i64>> = repeats
        .held
        .iter()
        .zip(excluded)
        .map(|(had, excluded)| {
            had.iter()
                .copied()
                .filter(|item| excluded.binary_search(item).is_err())
                .collect()
        })
        .collect();
    let never_had: Vec<Vec<i64>> = excluded
        .iter()
        .zip(&allowed_held)
        .map(|(excluded, held)| excluded.iter().chain(held).copied().collect())
        .collect();
    let fresh = model.catalogue.rank(rows, &never_had, ks);
    let (scores, index) = listed_scores(
        model.model.net.item_table(),
        rows,
        &allowed_held,
        Some(repeats),
        model.catalogue.score_kind(),
    );
    let again = top_k(&scores, ks, Some(&index));
    fresh
        .into_iter()
        .zip(again)
        .zip(ks)
        .map(|((mut merged, again), &k)| {
            merged.extend(again);
            merged.sort_by(|a, b| b.1.total_cmp(&a.1));
            merged.truncate(k);
            merged
        })
        .collect()
}

/// The repeat term of some rows: `[B]` offsets, and the items each row's user had (distinct,
/// ascending).
struct Repeats<'a> {
    offsets: Tensor,
    held: Vec<&'a [i64]>,
}

/// `([B, W] scores, [B, W] items)` of each row's listed items (`lists`, padded with the
/// padding item, which scores -inf) from the `[B, d]` hidden `rows`: only those rows of the
/// `table` are read. With `repeats`, their offsets are added to the items each row's user had.
/// Scored in `kind`, the catalogue's ([`Catalogue::score_kind`]), so that a list merged with
/// its ranking compares like with like.
fn listed_scores<L: AsRef<[i64]>>(
    table: &Tensor,
    rows: &Tensor,
    lists: &[L],
    repeats: Option<&Repeats>,
    kind: Kind,
) -> (Tensor, Tensor) {
    let index = padded_index(lists, rows.device());
    let vectors = table
        .index_select(0, &index.view(-1))
        .view([index.size()[0], index.size()[1], -1])
        .to_kind(kind);
    let scores = rows
        .to_kind(kind)
        .unsqueeze(1)
        .bmm(&vectors.transpose(1, 2))
        .squeeze_dim(1);
    let scores = match repeats {
        Some(repeats) => {
            // Membership found on the host, by binary search in each sorted `held`: compared
            // as tensors it is `[B, W, H]`, and a user's held items may number thousands.
            let width = index.size()[1] as usize;
            let mut held = vec![0f32; lists.len() * width];
            for ((list, had), row) in lists.iter().zip(&repeats.held).zip(held.chunks_mut(width)) {
                for (item, cell) in list.as_ref().iter().zip(row) {
                    *cell = f32::from(u8::from(had.binary_search(item).is_ok()));
                }
            }
            let held = Tensor::from_slice(&held).view([lists.len() as i64, width as i64]);
            let held = to_device_pinned(held, rows.device()).to_kind(repeats.offsets.kind());
            scores + repeats.offsets.unsqueeze(1) * held
        }
        None => scores,
    };
    // Padding points at column 0 and must never be chosen.
    let scores = scores.masked_fill(&index.eq(0), f64::NEG_INFINITY);
    (scores, index)
}

fn query_k(query: &Query) -> usize {
    match query {
        Query::TopK { k, .. } | Query::Candidates { k, .. } => *k,
        Query::Interests { top } => *top,
    }
}

/// `[V, C]` matrix spreading each item's mass evenly over its categories, or `None` when no item
/// has a category. Category `c` is the `c`-th name of [`category_names`].
fn category_matrix(item_categories: &[Vec<String>], device: Device) -> Option<Tensor> {
    let names = category_names(item_categories);
    if names.is_empty() {
        return None;
    }
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let mut matrix = vec![0f32; item_categories.len() * names.len()];
    for (item, categories) in item_categories.iter().enumerate() {
        for category in categories {
            matrix[item * names.len() + index[category.as_str()]] = 1.0 / categories.len() as f32;
        }
    }
    Some(
        Tensor::from_slice(&matrix)
            .view([item_categories.len() as i64, names.len() as i64])
            .to_device(device),
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::EncodedSeq;

    /// Listed items are scored in the catalogue's precision: a bf16 model's on the host in f32,
    /// exactly the products of its values (in 1/64 steps: exact in bf16, their dot products
    /// exact in f32 and not in bf16), as the catalogue ranks the rest.
    #[test]
    fn listed_items_score_in_the_catalogues_precision() {
        tch::manual_seed(3);
        let steps = |shape: [i64; 2]| (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 32.0).round() / 64.0;
        let (table, rows) = (steps([50, 24]), steps([3, 24]));
        let lists = vec![vec![1i64, 7, 9], vec![2, 3], vec![49, 11, 12, 13]];
        let bf16 = |t: &Tensor| t.to_kind(Kind::BFloat16);
        let (scores, index) = listed_scores(&bf16(&table), &bf16(&rows), &lists, None, Kind::Float);
        for (row, list) in lists.iter().enumerate() {
            for (column, &item) in list.iter().enumerate() {
                let exact = rows.get(row as i64).dot(&table.get(item)).double_value(&[]);
                let at = [row as i64, column as i64];
                assert_eq!((scores.double_value(&at), index.int64_value(&at)), (exact, item));
            }
        }
    }

    fn snapshot(events: &[(i64, u32, u32)]) -> HistorySnapshot {
        HistorySnapshot {
            version: 1,
            timestamps: events.iter().map(|e| e.0).collect(),
            items: events.iter().map(|e| e.1).collect(),
            types: events.iter().map(|e| e.2).collect(),
            events: Vec::new(),
            earlier_items: Vec::new(),
        }
    }

    /// The model input of positions `start..end` of `history`'s window from `start`.
    fn inputs(history: &HistorySnapshot, start: usize, end: usize, max_len: usize) -> Vec<[i64; 6]> {
        let view = HistoryView::new(&history.items, &history.timestamps, &history.types);
        let row: EncodedSeq = encode_window(view, start, i64::MAX / 2, max_len, 100);
        let pad = max_len - (history.items.len() - start);
        (pad..pad + end - start)
            .map(|j| {
                let r = &row;
                [
                    r.items[j],
                    r.types[j],
                    r.gaps[j],
                    r.prediction_gaps[j],
                    r.sessions[j],
                    r.prediction_hours[j],
                ]
            })
            .collect()
    }

    proptest! {
        /// Cached positions are reused only where the model would give them the very same
        /// input (the oracle: the encoded rows), and always after events are only appended.
        #[test]
        fn a_prefix_is_reused_only_where_its_positions_read_the_same_inputs(
            gaps in prop::collection::vec(prop::sample::select(vec![0i64, 1, 30, 99, 100, 250, 5_000]), 2..30),
            items in prop::collection::vec(1u32..4, 30),
            max_len in 2usize..24,
            cut in any::<prop::sample::Index>(),
            covered_share in 0.0f64..1.0,
            change in 0usize..4,
            at in any::<prop::sample::Index>(),
            late_gap in 0i64..300,
            appended in 1usize..6,
        ) {
            let mut t = 1_000;
            let events: Vec<(i64, u32, u32)> = gaps
                .iter()
                .zip(&items)
                .map(|(gap, &item)| { t += gap; (t, item, 1 + item % 2) })
                .collect();
            let history = snapshot(&events);
            let len = events.len();
            // A window from `start` of at most max_len events, its first `covered` cached.
            let start = len.saturating_sub(max_len) + cut.index(max_len.min(len));
            let start = start.min(len - 2);
            let covered = 1 + ((len - 2 - start) as f64 * covered_share) as usize;
            let cached = CoveredEvents::new(&history, start, start + covered);
            let mut changed = events.clone();
            match change {
                // Events appended after the newest.
                0 => {
                    let last = changed.last().unwrap().0;
                    changed.extend((1..=appended as i64).map(|k| (last + 10 * k, 2, 1)));
                }
                // One event inserted out of order.
                1 => {
                    let index = at.index(len);
                    changed.insert(index, (events[index].0.saturating_sub(late_gap).max(events[index.saturating_sub(1)].0), 3, 2));
                }
                // One event removed (erased, or dropped from the front).
                2 => { changed.remove(at.index(len)); }
                _ => {}
            }
            let after = snapshot(&changed);
            let found = cached.window_start(&after, max_len);
            if let Some(new_start) = found {
                prop_assert!(new_start + covered < after.items.len() && after.items.len() - new_start <= max_len);
                prop_assert_eq!(
                    inputs(&after, new_start, new_start + covered, max_len),
                    inputs(&history, start, start + covered, max_len)
                );
            }
            if change == 0 && changed.len() - start <= max_len {
                prop_assert_eq!(found, Some(start));
            }
        }
    }
}
