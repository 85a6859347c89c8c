//! `xsrec score`: raw next-item scores for given histories, in the model's index space. Meant
//! for checking another implementation against this one (models/torch parity tests).
use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use super::parse_device;
use crate::data::MAX_TIMESTAMP;
use crate::model::{encode, Artifact, Batch, HistoryView, Scorer};

#[derive(Debug, Clone, Args)]
pub struct ScoreArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// JSON lines, one history each: {"items":[…],"timestamps":[…],"types":[…],"at":T}
    /// (item and type indices as in items.tsv and config.json, oldest first).
    #[arg(long)]
    pub input: PathBuf,
    /// JSON lines, one {"scores":[…]} (all items, index 0 = padding) per input line.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Deserialize)]
struct HistoryLine {
    items: Vec<u32>,
    timestamps: Vec<i64>,
    types: Vec<u32>,
    at: i64,
}

pub fn run(args: &ScoreArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let artifact = Artifact::load(&args.model, device)?;
    let config = &artifact.model.config;
    let input =
        std::io::BufReader::new(std::fs::File::open(&args.input).with_context(|| format!("{}", args.input.display()))?);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args.out)?);
    for (n, line) in input.lines().enumerate() {
        let line = line?;
        let h: HistoryLine =
            serde_json::from_str(&line).with_context(|| format!("{}:{}", args.input.display(), n + 1))?;
        anyhow::ensure!(
            h.items.len() == h.timestamps.len() && h.items.len() == h.types.len() && !h.items.is_empty(),
            "{}:{}: items, timestamps and types must be non-empty and of equal length",
            args.input.display(),
            n + 1
        );
        anyhow::ensure!(
            h.items.iter().all(|&i| (i as usize) < config.num_items && i > 0)
                && h.types.iter().all(|&t| (t as usize) < config.num_event_types && t > 0),
            "{}:{}: item indices must be in 1..{} and type indices in 1..{}",
            args.input.display(),
            n + 1,
            config.num_items,
            config.num_event_types
        );
        anyhow::ensure!(
            h.timestamps
                .iter()
                .chain([&h.at])
                .all(|t| (0..=MAX_TIMESTAMP).contains(t)),
            "{}:{}: timestamps and `at` must be Unix seconds in 0..={MAX_TIMESTAMP}",
            args.input.display(),
            n + 1
        );
        let row = encode(
            HistoryView::new(&h.items, &h.timestamps, &h.types),
            h.at,
            config.max_len,
            config.session_gap_secs,
        );
        let scores = artifact.model.score_next(&Batch::new(&[row], device), &[&h.items]);
        let scores = Vec::<f32>::try_from(scores.view(-1).to_device(tch::Device::Cpu))?;
        writeln!(out, "{}", serde_json::json!({ "scores": scores }))?;
    }
    out.flush()?;
    Ok(())
}
