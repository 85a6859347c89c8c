//! `xsrec train`: fit a model on an event log and write the artifact directory.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::eval::evaluate_model;
use super::{parse_device, write_json, DataArgs};
use crate::data::formats::item_categories;
use crate::data::session::DEFAULT_SESSION_GAP_SECS;
use crate::data::split::build_sequences;
use crate::data::vocab::Vocab;
use crate::eval::bootstrap::PairedInterval;
use crate::eval::report::markdown_table;
use crate::model::artifact::Artifact;
use crate::model::{Arch, Combine, Features, ModelConfig, PositionOrigin, WindowPolicy};
use crate::train::plot::draw_curves;
use crate::train::{
    choose_on_validation, peak_rss_bytes, train, Batching, CheckpointPlan, EpochLog, Loss, TrainConfig, TrainOutcome,
};

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Artifact directory to write.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Arch::Transformer)]
    pub arch: Arch,
    /// Input window. 50 matches 200 on ml-100k and trains in half the time (docs/QUALITY.md).
    #[arg(long, default_value_t = 50)]
    pub max_len: usize,
    #[arg(long, default_value_t = 64)]
    pub d_model: usize,
    #[arg(long, default_value_t = 2)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Feed-forward width; defaults to 4 × d_model.
    #[arg(long)]
    pub ffn_dim: Option<usize>,
    #[arg(long, default_value_t = 0.3)]
    pub dropout: f64,
    /// Score with a separate output item table instead of the input embeddings.
    #[arg(long)]
    pub untied_output: bool,
    #[arg(long)]
    pub no_session_recency: bool,
    #[arg(long)]
    pub no_time_gap: bool,
    #[arg(long)]
    pub no_event_type: bool,
    #[arg(long)]
    pub no_prediction_gap: bool,
    /// Add hour-of-day and day-of-week (UTC) embeddings of the moment each position predicts,
    /// shared by all users (off by default; the clock readout reads each user's own habits).
    #[arg(long)]
    pub calendar: bool,
    /// Let each event read the previous session's mean item embedding (off by default; see
    /// docs/QUALITY.md for where it helps).
    #[arg(long)]
    pub session_summary: bool,
    /// Leave out the readout of what followed earlier sessions resembling the current one.
    #[arg(long)]
    pub no_session_successor: bool,
    /// Leave out the readout of what the user did at this time of day and week in earlier sessions.
    #[arg(long)]
    pub no_clock_readout: bool,
    /// Learn a score offset for the items the user already had (repeat purchases up, a film
    /// already rated down), so a ranking that keeps seen items orders them right. Needs
    /// `--loss-keep-seen`: with seen items out of the softmax nothing teaches it.
    #[arg(long, requires = "loss_keep_seen")]
    pub repeat_term: bool,
    /// Whether the model gets its readouts (session successor, clock): `auto` trains it without
    /// and with them and keeps them only when they gain validation NDCG@10 beyond noise (a
    /// paired bootstrap interval above zero, over all validation events or over those that open
    /// a session), since they carry logs with cross-session habits and cost a little on logs
    /// without (docs/QUALITY.md).
    #[arg(long, value_enum, default_value_t = Readouts::Auto)]
    pub readouts: Readouts,
    /// Where position embeddings count from: `window-start` keeps earlier positions' keys and
    /// values unchanged when an event is appended, which incremental inference needs.
    #[arg(long, value_enum, default_value_t = PositionOrigin::Newest)]
    pub positions: PositionOrigin,
    /// Also write every trained candidate's artifact to OUT/candidates/NAME (for ablations).
    #[arg(long)]
    pub keep_candidates: bool,
    #[arg(long, value_enum, default_value_t = Combine::Sum)]
    pub combine: Combine,
    /// Inactivity (seconds) that ends a session.
    #[arg(long, default_value_t = DEFAULT_SESSION_GAP_SECS)]
    pub session_gap: i64,
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// shuffled: uniform batches (better models: ml-100k and ML-1M, docs/QUALITY.md); grouped:
    /// batches of windows of similar length, less padding, up to twice as fast an epoch.
    #[arg(long, value_enum, default_value_t = Batching::Shuffled)]
    pub batching: Batching,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Decay the learning rate along a half cosine to zero over this many epochs, and stop
    /// there (a fixed budget); constant by default.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub lr_decay_epochs: Option<u64>,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    #[arg(long, default_value_t = 20)]
    pub patience: usize,
    #[arg(long, value_enum, default_value_t = Loss::Full)]
    pub loss: Loss,
    /// Keep already-seen items in the training softmax (by default they are left out, as in evaluation).
    #[arg(long)]
    pub loss_keep_seen: bool,
    /// Loss weight of targets that open a new session (continuing ones weigh 1).
    #[arg(long, default_value_t = 1.0)]
    pub session_start_weight: f64,
    /// Negatives per batch for `--loss sampled`.
    #[arg(long, default_value_t = 1024)]
    pub negatives: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// libtorch intra-op threads (default: all cores); 1 lets runs go side by side.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Continue an interrupted run from its newest checkpoint in OUT/checkpoint (written after
    /// every epoch, removed once the artifact is written); the command line must be the one
    /// that started it. The result is what the uninterrupted run would have written.
    #[arg(long)]
    pub resume: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Readouts {
    Auto,
    On,
    Off,
}

impl Readouts {
    /// The model configurations to train, simplest first: without any readout, and `with` them
    /// as the readout flags say.
    fn candidates(self, with: ModelConfig) -> Vec<ModelConfig> {
        let without = ModelConfig {
            features: Features {
                session_successor: false,
                clock_readout: false,
                ..with.features
            },
            ..with.clone()
        };
        match self {
            Readouts::On => vec![with],
            Readouts::Off => vec![without],
            Readouts::Auto if with == without => vec![with],
            Readouts::Auto => vec![without, with],
        }
    }
}

pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads as i32);
    }
    let device = parse_device(&args.device)?;
    let events = args.data.load()?;
    let set = build_sequences(&events, Vocab::new(), Vocab::new(), true);
    let has_types = set.has_event_types();
    let features = Features {
        session_recency: !args.no_session_recency,
        time_gap: !args.no_time_gap,
        // Without types in the data the embedding would learn one constant: leave it out.
        event_type: !args.no_event_type && has_types,
        prediction_gap: !args.no_prediction_gap,
        calendar: args.calendar,
        session_summary: args.session_summary,
        session_successor: !args.no_session_successor,
        clock_readout: !args.no_clock_readout,
        repeat_term: args.repeat_term,
        combine: args.combine,
        positions: args.positions,
        ..Features::default()
    };
    let model_config = ModelConfig {
        arch: args.arch,
        num_items: set.items.len(),
        num_event_types: set.event_types.len(),
        max_len: args.max_len,
        d_model: args.d_model,
        n_heads: args.heads,
        n_layers: args.layers,
        ffn_dim: args.ffn_dim.unwrap_or(4 * args.d_model),
        dropout: args.dropout,
        tied_output: !args.untied_output,
        features,
        session_gap_secs: args.session_gap,
    };
    model_config.validate().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        args.session_start_weight.is_finite() && args.session_start_weight > 0.0,
        "--session-start-weight must be a positive number, not {}",
        args.session_start_weight
    );
    anyhow::ensure!(
        !args.repeat_term || args.loss == Loss::Full,
        "--repeat-term needs --loss full: sampled negatives seldom include the user's own items, \
         so nothing would teach it"
    );
    let train_config = TrainConfig {
        seed: args.seed,
        max_epochs: args.epochs,
        batch_size: args.batch_size,
        batching: args.batching,
        learning_rate: args.lr,
        lr_decay_epochs: args.lr_decay_epochs.map(|epochs| epochs as usize),
        weight_decay: args.weight_decay,
        grad_clip: args.grad_clip,
        patience: args.patience,
        loss: args.loss,
        negatives: args.negatives,
        mask_seen: !args.loss_keep_seen,
        session_start_weight: args.session_start_weight,
        device,
        progress: !args.quiet,
        checkpoint: None,
    };
    eprintln!(
        "training {:?} on {} users, {} items, {} events ({device:?})",
        args.arch,
        set.users.len(),
        set.items.len() - 1,
        set.num_events()
    );
    let checkpoints = args.out.join("checkpoint");
    if args.resume && !checkpoints.is_dir() {
        eprintln!(
            "no checkpoint in {}: starting from the beginning",
            checkpoints.display()
        );
    }
    let outcomes: Vec<TrainOutcome> = args
        .readouts
        .candidates(model_config)
        .into_iter()
        .map(|config| {
            let plan = CheckpointPlan {
                dir: checkpoints.join(candidate_folder(&config.features)),
                resume: args.resume,
            };
            let train_config = TrainConfig {
                checkpoint: Some(plan),
                ..train_config.clone()
            };
            train(&set, config, &train_config)
        })
        .collect::<Result<_, _>>()?;
    let choice = choose_on_validation(&set, &outcomes, device);
    let kept = choice.kept;
    let candidates: Vec<serde_json::Value> = outcomes
        .iter()
        .enumerate()
        .map(|(index, o)| {
            json!({
                "features": o.model.config.features,
                "validation_ndcg10": o.best_validation_ndcg10(),
                "validation_gain": index.checked_sub(1).map(|i| choice.gains[i]),
                "best_epoch": o.best_epoch,
                "train_seconds": o.seconds,
            })
        })
        .collect();
    for (o, gain) in outcomes.iter().skip(1).zip(&choice.gains) {
        let interval =
            |g: &PairedInterval| format!("{:+.4} (95% CI {:+.4} .. {:+.4})", g.mean_difference, g.lower, g.upper);
        eprintln!(
            "validation NDCG@10 {:.4} {} vs {:.4}: {}; at session starts {}",
            o.best_validation_ndcg10(),
            readouts_name(&o.model.config.features),
            outcomes[0].best_validation_ndcg10(),
            interval(&gain.all),
            gain.session_starts
                .as_ref()
                .map_or_else(|| "too few to tell".to_owned(), interval),
        );
    }
    if outcomes.len() > 1 {
        eprintln!(
            "kept the model {}",
            readouts_name(&outcomes[kept].model.config.features)
        );
    }
    let train_seconds: f64 = outcomes.iter().map(|o| o.seconds).sum();
    let peak_rss_bytes = peak_rss_bytes();
    let item_counts = set.train_item_counts();
    let meta = args.data.load_item_meta()?;
    let item_categories = item_categories(&set.items, meta.as_ref());
    for (index, outcome) in outcomes.into_iter().enumerate() {
        if index != kept && !args.keep_candidates {
            continue;
        }
        let evaluation = evaluate_model(&outcome.model, &set, &item_counts, true, device, WindowPolicy::Newest);
        let (validation, test, popularity) = (&evaluation.validation, &evaluation.test, &evaluation.popularity_test);
        let info = json!({
            "data": {
                "source": args.data.data.display().to_string(),
                "users": set.users.len(),
                "items": set.items.len() - 1,
                "events": set.num_events(),
            },
            "training": train_config,
            "candidates": candidates,
            "kept": index == kept,
            "best_epoch": outcome.best_epoch,
            "epochs_run": outcome.epochs.len(),
            "train_seconds": train_seconds,
            "peak_rss_bytes": peak_rss_bytes,
            "metrics": { "validation": validation, "test": test, "popularity_test": popularity },
        });
        let name = candidate_folder(&outcome.model.config.features);
        let artifact = Artifact::new(
            outcome.model,
            set.items.clone(),
            set.event_types.clone(),
            item_counts.clone(),
            item_categories.clone(),
            info,
        );
        if args.keep_candidates {
            save(
                &artifact,
                &outcome.epochs,
                outcome.best_epoch,
                &args.out.join("candidates").join(name),
            )?;
        }
        if index != kept {
            continue;
        }
        save(&artifact, &outcome.epochs, outcome.best_epoch, &args.out)?;
        // The run is complete: nothing is left to resume.
        match std::fs::remove_dir_all(&checkpoints) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", checkpoints.display()))
            }
            _ => {}
        }
        println!(
            "{}",
            markdown_table(&[("model (test)".into(), test), ("popularity (test)".into(), popularity)])
        );
        eprintln!(
            "best epoch {} of {} in {:.0}s (peak memory {}); test NDCG@10 {:.4} HR@10 {:.4}; wrote {}",
            outcome.best_epoch,
            outcome.epochs.len(),
            train_seconds,
            peak_rss_bytes.map_or_else(
                || "unknown".to_owned(),
                |b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
            ),
            test.all.get("NDCG@10"),
            test.all.get("HR@10"),
            args.out.display()
        );
    }
    Ok(())
}

/// The artifact, its epoch log and (where fonts allow) its training curves.
fn save(artifact: &Artifact, epochs: &[EpochLog], best_epoch: usize, dir: &Path) -> anyhow::Result<()> {
    artifact
        .save(dir)
        .with_context(|| format!("saving artifact to {}", dir.display()))?;
    write_json(&dir.join("epochs.json"), &epochs)?;
    // A server without fonts still gets its model: the picture is a convenience.
    if let Err(e) = draw_curves(epochs, best_epoch, &dir.join("curves.png")) {
        eprintln!("warning: could not draw curves.png: {e:#}");
    }
    Ok(())
}

/// A candidate's folder under OUT/candidates and OUT/checkpoint.
fn candidate_folder(features: &Features) -> String {
    readouts_name(features).replace(' ', "-")
}

fn readouts_name(features: &Features) -> &'static str {
    match (features.session_successor, features.clock_readout) {
        (true, true) => "with readouts",
        (true, false) => "with the session successor",
        (false, true) => "with the clock readout",
        (false, false) => "without readouts",
    }
}
