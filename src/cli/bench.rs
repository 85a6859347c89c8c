//! `xsrec bench …`: the measurements behind docs/BENCHMARKS.md, runnable on any machine the
//! release binary reaches (`scripts/gpu-check.sh` strings them together on a GPU).
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::json;
use tch::Device;

use super::{parse_device, write_json, DataArgs};
use crate::bench::ceilings::Ceilings;
use crate::bench::load::{self, Mode, Target, Workload};
use crate::bench::plot::draw_forward;
use crate::bench::{forward, parity, recall};
use crate::data::formats::TimestampUnit;
use crate::data::split::build_sequences;
use crate::data::vocab::Vocab;
use crate::infer::rank::{Retrieval, RetrievalArgs, Scan};
use crate::model::artifact::{read_items, ITEMS_FILE};
use crate::model::{Arch, Artifact, Features, ModelConfig, PositionOrigin, Precision, SeqModel};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// What libtorch sees: version, whether libtorch_cuda is loaded, CUDA devices.
    Env,
    /// Peak bf16/fp32 matmul rate and device-to-device copy bandwidth.
    Ceilings(DeviceArgs),
    /// Serving one uncached batch, by batch size and stage, against the floor.
    Forward(ForwardArgs),
    /// Top-k agreement of a device (fp32 and bf16) with the CPU in fp32.
    Parity(ParityArgs),
    /// Recall@k of retrieval with a first stage (approximate, int8, bf16) against exact scoring, and
    /// ranking time and bytes of each.
    Recall(RecallArgs),
    /// Write an untrained artifact of a given shape (for load tests of large catalogues).
    InitModel(InitModelArgs),
    /// HTTP load against a running `xsrec serve`.
    Load(LoadArgs),
}

#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Also write the result as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The shape of a synthetic model.
#[derive(Debug, Args)]
pub struct ShapeArgs {
    #[arg(long, default_value_t = 1_000_000)]
    pub items: usize,
    #[arg(long, default_value_t = 128)]
    pub d_model: usize,
    #[arg(long, default_value_t = 200)]
    pub max_len: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 2)]
    pub heads: usize,
    #[arg(long, value_enum, default_value_t = Arch::Transformer)]
    pub arch: Arch,
    /// `window-start` makes a model that serves incrementally.
    #[arg(long, value_enum, default_value_t = PositionOrigin::Newest)]
    pub positions: PositionOrigin,
}

impl ShapeArgs {
    fn config(&self) -> anyhow::Result<ModelConfig> {
        let config = ModelConfig {
            arch: self.arch,
            num_items: self.items + 1,
            num_event_types: 2,
            max_len: self.max_len,
            d_model: self.d_model,
            n_heads: self.heads,
            n_layers: self.layers,
            ffn_dim: 4 * self.d_model,
            dropout: 0.0,
            tied_output: true,
            features: Features {
                positions: self.positions,
                ..Features::default()
            },
            session_gap_secs: 1800,
        };
        config.validate().map_err(anyhow::Error::msg)?;
        Ok(config)
    }
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// A saved model; without it, a random one of the shape below.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub shape: ShapeArgs,
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,128,256,512,1024")]
    pub batch_sizes: Vec<usize>,
    /// Timed batches per size (after three warm-up ones).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Also draw time per batch against batch size, with the floor, to this PNG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[command(flatten)]
    pub retrieval: RetrievalArgs,
}

/// Which model, and the histories to rank with it.
#[derive(Debug, Args)]
pub struct CasesArgs {
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    /// Histories to cut from (random synthetic ones without).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// What `--data`'s timestamps count: seconds or milliseconds.
    #[arg(long, value_enum, default_value_t)]
    pub timestamp_unit: TimestampUnit,
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct RecallArgs {
    /// Where the hidden states are computed (ranking follows the catalogue's device).
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub cases: CasesArgs,
    /// First stages to measure (`approximate`, `int8`, `bf16`), each with every shortlist.
    #[arg(long, value_delimiter = ',', default_value = "approximate,int8,bf16")]
    pub scans: Vec<Scan>,
    /// Shortlists to measure.
    #[arg(long, value_delimiter = ',', default_value = "100,300,1000,3000")]
    pub shortlists: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

#[derive(Debug, Args)]
pub struct ParityArgs {
    /// The device compared with the CPU.
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub cases: CasesArgs,
}

#[derive(Debug, Args)]
pub struct InitModelArgs {
    #[command(flatten)]
    pub shape: ShapeArgs,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: i64,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Send the timed calls over gRPC to this address (host:port) instead of REST; preloading,
    /// readiness and the server's metrics still go through --url.
    #[arg(long)]
    pub grpc: Option<String>,
    /// The served model's directory (for its item ids).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 100_000)]
    pub users: usize,
    /// Events per user sent before the runs; 0 skips preloading (users already there).
    #[arg(long, default_value_t = 50)]
    pub events_per_user: usize,
    /// Must not exceed the server's --max-events-per-call.
    #[arg(long, default_value_t = 1000)]
    pub events_per_call: usize,
    #[arg(long, value_enum, default_value_t = Mode::Recommend)]
    pub mode: Mode,
    /// Closed-loop clients per level (each sends its next call when the last is answered); with
    /// --rate, the most calls outstanding at once.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    pub concurrency: Vec<usize>,
    /// Open-loop levels instead: calls started per second whether or not earlier ones were
    /// answered (how overload is offered; see docs/RELIABILITY.md).
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Events per call with `--mode ingest`.
    #[arg(long, default_value_t = 100)]
    pub ingest_batch: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// How long to wait for the server to become ready.
    #[arg(long, default_value_t = 120)]
    pub ready_timeout_secs: u64,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(command: &BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Env => env(),
        BenchCommand::Ceilings(args) => {
            let device = parse_device(&args.device)?;
            let ceilings = Ceilings::measure(device);
            print_ceilings(device, &ceilings);
            emit(
                args.out.as_deref(),
                &json!({ "device": format!("{device:?}"), "ceilings": ceilings }),
            )
        }
        BenchCommand::Forward(args) => forward_bench(args),
        BenchCommand::Parity(args) => parity_bench(args),
        BenchCommand::Recall(args) => recall_bench(args),
        BenchCommand::InitModel(args) => init_model(args),
        BenchCommand::Load(args) => load_bench(args),
    }
}

fn emit(out: Option<&Path>, value: &impl Serialize) -> anyhow::Result<()> {
    match out {
        Some(path) => write_json(path, value),
        None => Ok(()),
    }
}

fn env() -> anyhow::Result<()> {
    // The trap this catches: an as-needed link drops libtorch_cuda and CUDA silently vanishes.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let cuda_library = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.contains("libtorch_cuda.so"));
    println!("libtorch_cuda loaded: {}", cuda_library.unwrap_or("no"));
    println!("CUDA available: {}", tch::Cuda::is_available());
    println!("CUDA devices: {}", tch::Cuda::device_count());
    println!("cuDNN available: {}", tch::Cuda::cudnn_is_available());
    println!("auto device: {:?}", Device::cuda_if_available());
    Ok(())
}

fn print_ceilings(device: Device, c: &Ceilings) {
    println!(
        "{device:?}: bf16 matmul {:.1} TFLOP/s, fp32 matmul {:.1} TFLOP/s, device copy {:.0} GB/s (read + write)",
        c.bf16_matmul_flops / 1e12,
        c.fp32_matmul_flops / 1e12,
        c.copy_bytes_per_sec / 1e9
    );
}

fn forward_bench(args: &ForwardArgs) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads.max(1) as i32);
    let device = parse_device(&args.device.device)?;
    let mut model = match &args.model {
        Some(dir) => Artifact::load(dir, device)?.model,
        None => SeqModel::new(args.shape.config()?, device),
    };
    model.set_precision(args.precision);
    let ceilings = Ceilings::measure(device);
    print_ceilings(device, &ceilings);
    let rows = forward::measure(
        &model,
        &ceilings,
        &args.batch_sizes,
        args.iters,
        7,
        args.retrieval.retrieval(),
    );
    let c = &model.config;
    println!(
        "{:?} {:?}: {} items, d {}, {} layers, {} heads, max_len {} (full-length histories, top-10)",
        c.arch,
        args.precision,
        c.num_items - 1,
        c.d_model,
        c.n_layers,
        c.n_heads,
        c.max_len
    );
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>8}",
        "batch", "encode", "copy in", "forward", "rank+out", "device ms", "seq/s", "floor ms", "floor%"
    );
    for r in &rows {
        println!(
            "{:>6} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>12.0} {:>10.4} {:>7.1}%",
            r.batch_size,
            r.encode_ms,
            r.copy_in_ms,
            r.forward_ms,
            r.rank_out_ms,
            r.device_ms,
            r.sequences_per_sec,
            r.floor_ms,
            100.0 * r.floor_fraction
        );
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "{} items, d {}, {} layers, max_len {}, {:?} on {device:?}",
            c.num_items - 1,
            c.d_model,
            c.n_layers,
            c.max_len,
            args.precision
        );
        // The numbers matter more than the picture: a machine without fonts still gets them.
        if let Err(e) = draw_forward(&rows, &title, path) {
            eprintln!("warning: could not draw {}: {e:#}", path.display());
        }
    }
    emit(
        args.device.out.as_deref(),
        &json!({
            "device": format!("{device:?}"),
            "precision": args.precision,
            "model": c,
            "ceilings": ceilings,
            "rows": rows,
        }),
    )
}

/// `args.users` histories cut from the users of `args.data` at random points, or synthetic ones.
fn bench_cases(artifact: &Artifact, args: &CasesArgs) -> anyhow::Result<Vec<parity::Case>> {
    let (users, seed) = (args.users, args.seed);
    Ok(match &args.data {
        Some(path) => {
            let data = DataArgs {
                data: path.to_path_buf(),
                skip_bad_rows: false,
                item_meta: None,
                timestamp_unit: args.timestamp_unit,
            };
            let set = build_sequences(
                &data.load()?,
                artifact.items.clone(),
                artifact.event_types.clone(),
                false,
            );
            anyhow::ensure!(!set.users.is_empty(), "{}: no user has a known item", path.display());
            parity::cases_from_users(&set.users, users, seed, &artifact.model)
        }
        None => parity::synthetic_cases(users, seed, &artifact.model),
    })
}

fn recall_bench(recall_args: &RecallArgs) -> anyhow::Result<()> {
    tch::set_num_threads(recall_args.threads.max(1) as i32);
    let device = parse_device(&recall_args.device.device)?;
    let args = &recall_args.cases;
    let artifact = Artifact::load(&args.model, device)?;
    let cases = bench_cases(&artifact, args)?;
    let rows = recall::measure(
        &artifact.model,
        &cases,
        args.k,
        args.batch_size,
        &recall_args.scans,
        &recall_args.shortlists,
    );
    println!(
        "{} users, top-{}, batches of {}, {} items, d = {}:",
        cases.len(),
        args.k,
        args.batch_size,
        artifact.model.config.num_items - 1,
        artifact.model.config.d_model
    );
    println!("  retrieval            recall@k  min  identical  ms/batch  speed-up  extra MiB  build s  unsettled");
    let exact_ms = rows.first().map_or(0.0, |r| r.ms_per_batch);
    for row in &rows {
        let name = &row.retrieval;
        println!(
            "  {name:<20} {:>8.4}  {:>3}  {:>9}  {:>8.1}  {:>7.2}×  {:>9.1}  {:>7.1}  {:>9}",
            row.recall,
            row.min_overlap,
            row.identical_lists,
            row.ms_per_batch,
            exact_ms / row.ms_per_batch.max(1e-9),
            row.extra_mib,
            row.build_seconds,
            row.unsettled_rows
        );
    }
    emit(
        recall_args.device.out.as_deref(),
        &json!({ "device": format!("{device:?}"), "k": args.k, "users": cases.len(), "rows": rows }),
    )
}

fn parity_bench(parity_args: &ParityArgs) -> anyhow::Result<()> {
    let device = parse_device(&parity_args.device.device)?;
    let args = &parity_args.cases;
    let reference = Artifact::load(&args.model, Device::Cpu)?;
    let cases = bench_cases(&reference, args)?;
    let cpu = parity::rank_cases(&reference.model, &cases, args.k, args.batch_size, Retrieval::Exact);
    let mut results = serde_json::Map::new();
    println!(
        "{} users, top-{}: {device:?} against the CPU in fp32",
        cases.len(),
        args.k
    );
    let mut model = Artifact::load(&args.model, device)?.model;
    // fp32 first: casting to bf16 is one-way.
    for precision in [Precision::Fp32, Precision::Bf16] {
        model.set_precision(precision);
        let found = parity::agreement(
            &cpu,
            &parity::rank_cases(&model, &cases, args.k, args.batch_size, Retrieval::Exact),
        );
        println!(
            "{precision:?}: identical lists {}/{}, mean overlap {:.2}/{} (min {}), max |score diff| {:.2e}",
            found.identical_lists, found.users, found.mean_overlap, args.k, found.min_overlap, found.max_abs_score_diff
        );
        results.insert(format!("{precision:?}").to_lowercase(), serde_json::to_value(found)?);
    }
    emit(
        parity_args.device.out.as_deref(),
        &json!({ "device": format!("{device:?}"), "k": args.k, "agreement": results }),
    )
}

fn init_model(args: &InitModelArgs) -> anyhow::Result<()> {
    let config = args.shape.config()?;
    tch::manual_seed(args.seed);
    let model = SeqModel::new(config.clone(), Device::Cpu);
    let items = Vocab::from_ids((1..config.num_items).map(|i| format!("i{i}")));
    // A falling popularity so that the cold-start fallback has an order.
    let item_counts = std::iter::once(0)
        .chain((1..config.num_items as u64).map(|i| config.num_items as u64 - i))
        .collect();
    let artifact = Artifact::new(
        model,
        items,
        Vocab::from_ids([String::new()]),
        item_counts,
        vec![Vec::new(); config.num_items],
        json!({ "untrained": true, "seed": args.seed }),
    );
    artifact.save(&args.out)?;
    println!(
        "wrote untrained {:?} with {} items to {}",
        config.arch,
        config.num_items - 1,
        args.out.display()
    );
    Ok(())
}

fn load_bench(args: &LoadArgs) -> anyhow::Result<()> {
    let (items, _, _) = read_items(&crate::model::builtin::resolve(&args.model)?.join(ITEMS_FILE))?;
    let workload = Workload {
        mode: args.mode,
        users: args.users,
        item_ids: items.ids().into(),
        k: args.k,
        ingest_batch: args.ingest_batch,
        seed: args.seed,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let max_connections = args.concurrency.iter().copied().max().unwrap_or(1);
        let mut target = Target::new(&args.url, max_connections)?;
        target.wait_ready(Duration::from_secs(args.ready_timeout_secs)).await?;
        let preloaded = if args.events_per_user > 0 {
            let report = load::preload(&target, &workload, args.events_per_user, args.events_per_call, 32)
            .await
            .context("preloading histories")?;
            println!(
                "preloaded {} users, {} events in {:.1} s",
                report.users, report.events, report.seconds
            );
            Some(report)
        } else {
            None
        };
        if let Some(addr) = &args.grpc {
            target = target.over_grpc(addr).await?;
        }
        let mut levels = Vec::new();
        let duration = Duration::from_secs(args.duration_secs);
        let open_loop = args.rate.iter().map(|&rate| (Some(rate), max_connections));
        let closed_loop = args.concurrency.iter().map(|&concurrency| (None, concurrency));
        let plan: Vec<_> = if args.rate.is_empty() { closed_loop.collect() } else { open_loop.collect() };
        for (rate, concurrency) in plan {
            let level = match rate {
                Some(rate) => load::run_rate(&target, &workload, rate, concurrency, duration).await?,
                None => load::run_level(&target, &workload, concurrency, duration).await?,
            };
            let s = &level.server;
            if level.mode == Mode::Ingest {
                println!("  {:.0} events/s in calls of {}", level.events_per_sec, args.ingest_batch);
            }
            let offered = rate.map_or(String::new(), |rate| format!(" offered {rate:.0}/s"));
            println!(
                "{:?} c={concurrency}{offered}: {:.0} req/s, mean {:.2} ms (server {:.2}), p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, shed {} (p99 {:.2} ms), not sent {}, errors {} | batches: mean size {:.1}, queue wait {:.2} ms, forward {:.2} ms, rank {:.2} ms, worker busy {:.0}%",
                level.mode,
                level.requests_per_sec,
                level.mean_ms,
                s.mean_recommend_ms,
                level.p50_ms,
                level.p99_ms,
                level.max_ms,
                level.shed,
                level.shed_p99_ms,
                level.not_sent,
                level.errors,
                s.mean_batch_size,
                s.mean_queue_wait_ms,
                s.mean_forward_ms,
                s.mean_rank_ms,
                100.0 * s.worker_busy_fraction
            );
            if let Some(error) = &level.first_error {
                println!("  first error: {error}");
            }
            levels.push(level);
        }
        emit(args.out.as_deref(), &json!({ "url": args.url, "preload": preloaded, "levels": levels }))
    })
}
