//! `xsrec cross-session`: one log of the synthetic cross-session family, scored by its
//! references (popularity, the last-item-plus-gap transitions, the oracle) and by every model
//! trained on it, split by whether the held-out event opens a session. `scripts/cross_session.sh`
//! trains the models; this command is the scoreboard.
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::{parse_device, write_json};
use crate::data::family::{flatten_time, generate, FamilyParams, Pattern};
use crate::data::split::{build_sequences, SequenceSet, Target};
use crate::data::vocab::Vocab;
use crate::eval::bootstrap::paired_bootstrap;
use crate::eval::references::{label_sessions_from, OracleScorer, TransitionBaseline};
use crate::eval::report::markdown_table;
use crate::eval::{evaluate, ndcg10, CaseResult, CaseScorer, EvalOptions, SplitMetrics};
use crate::model::{Artifact, Popularity};

#[derive(Debug, Clone, Args)]
pub struct CrossSessionArgs {
    #[arg(long, value_enum)]
    pub pattern: Pattern,
    #[arg(long)]
    pub seed: u64,
    /// The number of users, when `xsrec data synth` was given one.
    #[arg(long)]
    pub users: Option<usize>,
    /// Folder of artifacts trained on this log, one per subfolder; those named `control…` were
    /// trained on the flattened-time control and are scored on it.
    #[arg(long)]
    pub runs: Option<PathBuf>,
    /// Write every metric, the parameters and the paired comparisons as JSON.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Scored before the models, in this order.
const REFERENCES: [&str; 4] = ["popularity", "last item + gap", "user's topics", "oracle"];
/// The references' input window; they read the whole history, so only batching depends on it.
const REFERENCE_MAX_LEN: usize = 50;

pub fn run(args: &CrossSessionArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let mut params = FamilyParams::draw(args.pattern, args.seed);
    params.users = args.users.unwrap_or(params.users);
    let log = generate(&params);
    let control = flatten_time(&log.events);
    let truth = build_sequences(&log.events, Vocab::new(), Vocab::new(), true);
    let options = |max_len, session_gap_secs| EvalOptions {
        target: Target::Test,
        exclude_seen: true,
        batch_size: 256,
        max_len,
        session_gap_secs,
        device,
        window: crate::model::WindowPolicy::Newest,
    };
    let reference_options = options(REFERENCE_MAX_LEN, params.session_gap_secs);
    let mut scored: Vec<(String, Vec<CaseResult>)> = vec![
        (
            REFERENCES[0].into(),
            evaluate(
                &Popularity::new(&truth.train_item_counts(), device),
                &truth,
                &reference_options,
            ),
        ),
        (
            REFERENCES[1].into(),
            evaluate(
                &TransitionBaseline::fit(&truth, params.session_gap_secs),
                &truth,
                &reference_options,
            ),
        ),
        (
            REFERENCES[2].into(),
            evaluate(&OracleScorer::topics_only(&log), &truth, &reference_options),
        ),
        (
            REFERENCES[3].into(),
            evaluate(&OracleScorer::new(&log), &truth, &reference_options),
        ),
    ];
    for (name, dir) in artifact_dirs(args.runs.as_ref())? {
        let artifact = Artifact::load(&dir, device).with_context(|| format!("loading {}", dir.display()))?;
        let events = if name.starts_with("control") {
            &control
        } else {
            &log.events
        };
        let set = build_sequences(events, artifact.items.clone(), artifact.event_types.clone(), false);
        anyhow::ensure!(
            set.unknown_item_events == 0 && set.users.len() == truth.users.len(),
            "{} was not trained on the {} log of seed {}",
            dir.display(),
            params.pattern.name(),
            params.seed
        );
        let config = &artifact.model.config;
        let scorer: &dyn CaseScorer = &artifact.model;
        let results = evaluate(scorer, &set, &options(config.max_len, config.session_gap_secs));
        scored.push((name, results));
    }
    for (_, results) in &mut scored {
        label_sessions_from(results, &truth, params.session_gap_secs);
    }
    let metrics: Vec<(String, SplitMetrics)> = scored
        .iter()
        .map(|(name, results)| (name.clone(), SplitMetrics::from_results(results)))
        .collect();
    let rows: Vec<(String, &SplitMetrics)> = metrics.iter().map(|(n, m)| (n.clone(), m)).collect();
    println!("{}", markdown_table(&rows));
    let by_rule = match params.pattern {
        Pattern::Mixture => session_starts_by_rule(&scored, &truth, &log.mechanisms),
        _ => serde_json::Value::Null,
    };
    let comparisons = session_start_comparisons(&scored);
    for c in &comparisons {
        println!(
            "session-start NDCG@10, {}: {:+.4} (95% CI {:+.4} .. {:+.4})",
            c["pair"].as_str().unwrap_or_default(),
            c["mean_difference"].as_f64().unwrap_or_default(),
            c["lower"].as_f64().unwrap_or_default(),
            c["upper"].as_f64().unwrap_or_default()
        );
    }
    if let Some(path) = &args.json_out {
        let metrics: serde_json::Map<String, serde_json::Value> =
            metrics.into_iter().map(|(name, m)| (name, json!(m))).collect();
        write_json(
            path,
            &json!({
                "params": params,
                "metrics": metrics,
                "session_start_comparisons": comparisons,
                "session_start_ndcg10_by_rule": by_rule,
            }),
        )?;
    }
    Ok(())
}

/// In a mixture every user follows one of the rules: session-start NDCG@10 of each scorer over
/// the users of each rule, printed as a table and returned as JSON (`{scorer: {rule: value}}`),
/// to show which rule a model misses.
fn session_starts_by_rule(
    scored: &[(String, Vec<CaseResult>)],
    truth: &SequenceSet,
    mechanisms: &[Pattern],
) -> serde_json::Value {
    let rule_of = |user: usize| {
        let number: usize = truth.users[user].user_id[1..]
            .parse()
            .expect("family user ids are u<n>");
        mechanisms[number]
    };
    let rules: Vec<Pattern> = Pattern::ALL.into_iter().filter(|p| mechanisms.contains(p)).collect();
    let header: Vec<String> = rules.iter().map(|r| r.name().to_owned()).collect();
    println!(
        "\nsession-start NDCG@10 by the user's rule\n\n| scorer | {} |",
        header.join(" | ")
    );
    println!("|---|{}", "---:|".repeat(rules.len()));
    let mut out = serde_json::Map::new();
    for (name, results) in scored {
        let values = ndcg10(results);
        let mut row = serde_json::Map::new();
        for &rule in &rules {
            let picked: Vec<f64> = results
                .iter()
                .zip(&values)
                .filter(|(r, _)| r.new_session && rule_of(r.user) == rule)
                .map(|(_, &v)| v)
                .collect();
            row.insert(
                rule.name().into(),
                json!(picked.iter().sum::<f64>() / picked.len().max(1) as f64),
            );
        }
        let cells: Vec<String> = rules
            .iter()
            .map(|r| format!("{:.3}", row[r.name()].as_f64().unwrap_or_default()))
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
        out.insert(name.clone(), serde_json::Value::Object(row));
    }
    println!();
    serde_json::Value::Object(out)
}

/// `(name, dir)` for every artifact under `runs`, sorted by name.
fn artifact_dirs(runs: Option<&PathBuf>) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let Some(runs) = runs else { return Ok(Vec::new()) };
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(runs).with_context(|| format!("reading {}", runs.display()))? {
        let path = entry?.path();
        if path.join("config.json").is_file() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            dirs.push((name, path));
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Paired bootstrap intervals of session-start NDCG@10 for every trained model against the
/// control and the references that read the history (transitions, user's topics, oracle).
fn session_start_comparisons(scored: &[(String, Vec<CaseResult>)]) -> Vec<serde_json::Value> {
    let starts = |results: &[CaseResult]| -> Vec<f64> {
        results
            .iter()
            .zip(ndcg10(results))
            .filter(|(r, _)| r.new_session)
            .map(|(_, v)| v)
            .collect()
    };
    let find = |name: &str| scored.iter().find(|(n, _)| n == name).map(|(_, r)| starts(r));
    let references: Vec<(&str, Vec<f64>)> = ["control", REFERENCES[1], REFERENCES[2], REFERENCES[3]]
        .into_iter()
        .filter_map(|name| find(name).map(|v| (name, v)))
        .collect();
    let mut out = Vec::new();
    let trained = scored
        .iter()
        .filter(|(n, _)| !REFERENCES.contains(&n.as_str()) && !n.starts_with("control"));
    for (name, results) in trained {
        let model = starts(results);
        for (reference, values) in &references {
            let interval = paired_bootstrap(&model, values, 2000, 0.95, 7);
            out.push(json!({
                "pair": format!("{name} − {reference}"),
                "model": name,
                "reference": reference,
                "cases": model.len(),
                "mean_difference": interval.mean_difference,
                "lower": interval.lower,
                "upper": interval.upper,
            }));
        }
    }
    out
}
