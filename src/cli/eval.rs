//! `xsrec eval`: full-ranking metrics of a saved model on an event log, beside popularity.
use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use tch::Device;

use super::{parse_device, write_json, DataArgs};
use crate::data::split::{build_sequences, SequenceSet, Target};
use crate::eval::bootstrap::paired_bootstrap;
use crate::eval::report::{markdown_table, write_predictions};
use crate::eval::{evaluate, ndcg10, CaseResult, CaseScorer, EvalOptions, SplitMetrics};
use crate::model::{Artifact, Popularity, SeqModel, WindowPolicy};

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Artifact directory written by `xsrec train`.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Keep items the user already interacted with in the ranking.
    #[arg(long)]
    pub include_seen: bool,
    /// Per test user: user_id then the top-20 item ids, tab-separated, best first.
    #[arg(long)]
    pub predictions_out: Option<PathBuf>,
    /// Write all metrics and the bootstrap comparison as JSON.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The events each case's model reads: `served` measures what incremental serving costs
    /// (a window restarted short of full, see `WindowPolicy::Served`).
    #[arg(long, value_enum, default_value_t = WindowPolicy::Newest)]
    pub window: WindowPolicy,
}

fn options(model: &SeqModel, target: Target, exclude_seen: bool, device: Device, window: WindowPolicy) -> EvalOptions {
    EvalOptions {
        target,
        exclude_seen,
        batch_size: 256,
        max_len: model.config.max_len,
        session_gap_secs: model.config.session_gap_secs,
        device,
        window,
    }
}

/// A model's validation and test results beside popularity's test results.
pub struct Evaluation {
    pub validation: SplitMetrics,
    pub test: SplitMetrics,
    pub test_results: Vec<CaseResult>,
    pub popularity_test: SplitMetrics,
    pub popularity_results: Vec<CaseResult>,
}

pub fn evaluate_model(
    model: &SeqModel,
    set: &SequenceSet,
    item_counts: &[u64],
    exclude_seen: bool,
    device: Device,
    window: WindowPolicy,
) -> Evaluation {
    let run =
        |scorer: &dyn CaseScorer, target| evaluate(scorer, set, &options(model, target, exclude_seen, device, window));
    let test_results = run(model, Target::Test);
    let popularity_results = run(&Popularity::new(item_counts, device), Target::Test);
    Evaluation {
        validation: SplitMetrics::from_results(&run(model, Target::Validation)),
        test: SplitMetrics::from_results(&test_results),
        test_results,
        popularity_test: SplitMetrics::from_results(&popularity_results),
        popularity_results,
    }
}

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let artifact = Artifact::load(&args.model, device)?;
    let events = args.data.load()?;
    let set = build_sequences(&events, artifact.items.clone(), artifact.event_types.clone(), false);
    if set.unknown_item_events > 0 {
        eprintln!(
            "{} events name items the model does not know; they are left out",
            set.unknown_item_events
        );
    }
    let exclude_seen = !args.include_seen;
    let Evaluation {
        validation,
        test,
        test_results,
        popularity_test,
        popularity_results,
    } = evaluate_model(
        &artifact.model,
        &set,
        &artifact.item_counts,
        exclude_seen,
        device,
        args.window,
    );
    let versus_popularity = paired_bootstrap(&ndcg10(&test_results), &ndcg10(&popularity_results), 2000, 0.95, 7);
    println!(
        "{}",
        markdown_table(&[
            ("model (validation)".into(), &validation),
            ("model (test)".into(), &test),
            ("popularity (test)".into(), &popularity_test)
        ])
    );
    println!(
        "test NDCG@10, model − popularity: {:+.4} (95% paired bootstrap CI {:+.4} .. {:+.4}, {} users)",
        versus_popularity.mean_difference,
        versus_popularity.lower,
        versus_popularity.upper,
        test_results.len()
    );
    if let Some(path) = &args.predictions_out {
        write_predictions(path, &set, &test_results)?;
    }
    if let Some(path) = &args.json_out {
        let per_user: serde_json::Map<String, serde_json::Value> = test_results
            .iter()
            .zip(ndcg10(&test_results))
            .map(|(r, v)| (set.users[r.user].user_id.clone(), json!(v)))
            .collect();
        write_json(
            path,
            &json!({
                "model": args.model.display().to_string(),
                "exclude_seen": exclude_seen,
                "window": args.window,
                "validation": validation,
                "test": test,
                "popularity_test": popularity_test,
                "ndcg10_vs_popularity": versus_popularity,
                "test_ndcg10_per_user": per_user,
            }),
        )?;
    }
    Ok(())
}
