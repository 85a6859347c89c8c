//! The inference worker's own steps, timed: its forward pass (to the newest position's hidden
//! state) by batch size on an ml-100k-sized model, and its ranking step (scores against the item
//! table, padding and 50 seen items per row masked, top 10) by catalogue size; and one append
//! against one full forward pass by history length (incremental inference).
//! Run with `cargo bench`; results are recorded in docs/BENCHMARKS.md.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tch::{Device, Kind, Tensor};
use xsrec::infer::rank::{Catalogue, Retrieval, Scan};
use xsrec::model::{encode, Arch, Batch, Features, HistoryView, ModelConfig, PositionOrigin, SeqModel, Slot};

fn model(num_items: usize, max_len: usize) -> SeqModel {
    model_with(num_items, max_len, Features::default())
}

fn model_with(num_items: usize, max_len: usize, features: Features) -> SeqModel {
    tch::manual_seed(0);
    SeqModel::new(
        ModelConfig {
            arch: Arch::Transformer,
            num_items,
            num_event_types: 2,
            max_len,
            d_model: 64,
            n_heads: 2,
            n_layers: 2,
            ffn_dim: 256,
            dropout: 0.0,
            tied_output: true,
            features,
            session_gap_secs: 1800,
        },
        Device::Cpu,
    )
}

/// `batch` users with 50-event histories (the load script's shape), encoded for a 200-wide model.
fn batch(batch: usize, num_items: usize) -> Batch {
    histories(batch, 50, num_items, 200)
}

/// `batch` users with `len`-event histories, encoded for a `max_len`-wide model.
fn histories(batch: usize, len: usize, num_items: usize, max_len: usize) -> Batch {
    users_histories(0..batch, len, num_items, max_len)
}

/// The `len`-event histories of `users` (each user's own items), for a `max_len`-wide model.
fn users_histories(users: std::ops::Range<usize>, len: usize, num_items: usize, max_len: usize) -> Batch {
    let rows: Vec<_> = users
        .map(|u| {
            let items: Vec<u32> = (0..len)
                .map(|i| 1 + ((u * 31 + i * 7) % (num_items - 1)) as u32)
                .collect();
            let timestamps: Vec<i64> = (0..len as i64).map(|i| 1_000_000 + i * 120).collect();
            encode(
                HistoryView::new(&items, &timestamps, &vec![1; len]),
                1_000_000 + len as i64 * 120,
                max_len,
                1800,
            )
        })
        .collect();
    Batch::trimmed(&rows, Device::Cpu)
}

/// The default recipe's model (`--readouts off`, no event types in ml-100k), positions counted
/// from the window start: the model the server appends to.
fn served_features() -> Features {
    Features {
        positions: PositionOrigin::WindowStart,
        event_type: false,
        session_successor: false,
        clock_readout: false,
        ..Features::default()
    }
}

/// The fresh workload's step: a user with `len` events, whose state was cached when they had
/// `len − 1`, asks again. In full that is a forward pass over `len` positions; from the cached
/// prefix (every position but the then newest) it is two, the previous newest and the new one.
fn append_vs_full_by_length(c: &mut Criterion) {
    let model = model_with(1683, 200, served_features());
    for size in [1usize, 64] {
        let mut group = c.benchmark_group(format!("append_vs_full_batch{size}"));
        for len in [10usize, 50, 100, 200] {
            let before = histories(size, len - 1, 1683, 200);
            let mut pool = model.net.prefix_pool(1 << 30, Kind::Float).expect("appendable");
            let slots: Vec<Slot> = (0..size).map(|_| pool.allocate().expect("room")).collect();
            let slots: Vec<&Slot> = slots.iter().collect();
            let _ = model.extend_last_state(&before, &mut pool, &slots).expect("appendable");
            let now = histories(size, len, 1683, 200);
            group.throughput(Throughput::Elements(size as u64));
            group.bench_with_input(BenchmarkId::new("full", len), &now, |b, now| {
                b.iter(|| model.last_state(now))
            });
            // Each iteration appends the same two positions again: the slots are put back to
            // the cached length after every pass, which costs nothing beside it.
            let held = pool.len(slots[0]);
            group.bench_with_input(BenchmarkId::new("append", len), &now, |b, now| {
                b.iter(|| {
                    let hidden = model.extend_last_state(now, &mut pool, &slots);
                    slots.iter().for_each(|slot| pool.truncate(slot, held));
                    hidden
                })
            });
            // A first visit: the whole window computed into an empty slot.
            group.bench_with_input(BenchmarkId::new("into_empty_slot", len), &now, |b, now| {
                b.iter(|| {
                    slots.iter().for_each(|slot| pool.truncate(slot, 0));
                    model.extend_last_state(now, &mut pool, &slots)
                })
            });
        }
        group.finish();
    }
}

/// Appends as the server sees them: each pass takes `BATCH` users drawn from a pool of 10,000
/// cached users (the load script's population), so their keys and values are cold in the CPU's
/// caches, as they are between two requests of one user under load. A pool this size is
/// ~0.5 GB at max_len 50; the hot loops of an append wait on memory here, not in the bench above.
fn append_cold_pool(c: &mut Criterion) {
    const USERS: usize = 10_000;
    const BATCH: usize = 26;
    let model = model_with(1683, 50, served_features());
    let mut pool = model.net.prefix_pool(1 << 31, Kind::Float).expect("appendable");
    let groups: Vec<(Vec<Slot>, Batch)> = (0..USERS / BATCH)
        .map(|group| {
            let slots: Vec<Slot> = (0..BATCH).map(|_| pool.allocate().expect("room")).collect();
            let refs: Vec<&Slot> = slots.iter().collect();
            let users = group * BATCH..(group + 1) * BATCH;
            let before = users_histories(users.clone(), 39, 1683, 50);
            let _ = model.extend_last_state(&before, &mut pool, &refs).expect("appendable");
            (slots, users_histories(users, 40, 1683, 50))
        })
        .collect();
    let held = pool.len(&groups[0].0[0]);
    let mut group = c.benchmark_group("append_cold_pool_10k_users");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut next = 0;
    group.bench_function(BenchmarkId::new("append", BATCH), |b| {
        b.iter(|| {
            // A stride through the groups, so that consecutive passes touch distant memory.
            next = (next + 97) % groups.len();
            let (slots, now) = &groups[next];
            let refs: Vec<&Slot> = slots.iter().collect();
            let hidden = model.extend_last_state(now, &mut pool, &refs);
            refs.iter().for_each(|slot| pool.truncate(slot, held));
            hidden
        })
    });
    group.finish();
}

fn forward_by_batch_size(c: &mut Criterion) {
    let model = model(1683, 200);
    let mut group = c.benchmark_group("forward_ml100k_L50");
    for size in [1usize, 8, 32, 64, 128] {
        let input = batch(size, 1683);
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &input, |b, input| {
            b.iter(|| model.last_hidden(input))
        });
    }
    group.finish();
}

fn topk_by_catalogue(c: &mut Criterion) {
    let mut group = c.benchmark_group("score_topk10_batch64");
    for items in [1_683usize, 20_000, 100_000, 1_000_000] {
        let model = model(items, 200);
        let hidden = Tensor::randn([64, 64], (Kind::Float, Device::Cpu));
        let seen: Vec<Vec<i64>> = (0..64)
            .map(|u| (0..50).map(|i| 1 + ((u * 31 + i * 7) % (items as i64 - 1))).collect())
            .collect();
        group.throughput(Throughput::Elements(64));
        let shortlisted = [Scan::ProductQuantized, Scan::Int8, Scan::Bf16]
            .map(|scan| (scan.to_string(), Retrieval::Shortlist { scan, shortlist: 1000 }));
        for (name, retrieval) in std::iter::once(("exact".to_owned(), Retrieval::Exact)).chain(shortlisted) {
            let catalogue = Catalogue::new(model.net.item_table(), retrieval);
            group.bench_with_input(BenchmarkId::new(name, items), &items, |b, _| {
                b.iter(|| catalogue.rank(&hidden, &seen, &[10; 64]))
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = forward_by_batch_size, topk_by_catalogue, append_vs_full_by_length, append_cold_pool
}
criterion_main!(benches);
