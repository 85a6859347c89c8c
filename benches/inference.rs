//! The inference worker's own steps, timed: its forward pass (to the newest position's hidden
//! state) by batch size on an ml-100k-sized model, and its ranking step (scores against the item
//! table, padding and 50 seen items per row masked, top 10) by catalogue size.
//! Run with `cargo bench`; results are recorded in docs/BENCHMARKS.md.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tch::{Device, Kind, Tensor};
use xsrec::infer::worker::rank_excluding;
use xsrec::model::{encode, Arch, Batch, Features, HistoryView, ModelConfig, SeqModel};

fn model(num_items: usize, max_len: usize) -> SeqModel {
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
            features: Features::default(),
            session_gap_secs: 1800,
        },
        Device::Cpu,
    )
}

/// `batch` users with 50-event histories (the load script's shape), encoded for a 200-wide model.
fn batch(batch: usize, num_items: usize) -> Batch {
    let rows: Vec<_> = (0..batch)
        .map(|u| {
            let items: Vec<u32> = (0..50)
                .map(|i| 1 + ((u * 31 + i * 7) % (num_items - 1)) as u32)
                .collect();
            let timestamps: Vec<i64> = (0..50).map(|i| 1_000_000 + i * 120).collect();
            encode(
                HistoryView::new(&items, &timestamps, &[1; 50]),
                1_000_000 + 50 * 120,
                200,
                1800,
            )
        })
        .collect();
    Batch::trimmed(&rows, Device::Cpu)
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
        group.bench_with_input(BenchmarkId::from_parameter(items), &items, |b, _| {
            b.iter(|| rank_excluding(model.net.score(&hidden), &seen, &[10; 64]))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = forward_by_batch_size, topk_by_catalogue
}
criterion_main!(benches);
