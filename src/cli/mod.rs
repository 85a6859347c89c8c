//! Command-line front ends: argument types and the glue that runs each command. Errors here are
//! `anyhow` (the edge); the library rooms below return typed errors.
pub mod bench;
pub mod cross_session;
pub mod data;
pub mod eval;
pub mod explain;
pub mod history;
pub mod score;
pub mod serve;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use crate::data::formats::{load_events, load_item_meta, ItemMeta, LoadOptions, TimestampUnit};
use crate::data::Event;
pub use crate::model::parse_device;

/// Input data flags shared by every command that reads an event log.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Event log: RecBole `.inter`, MovieLens `u.data` / `ratings.dat`, or CSV/TSV with a header.
    #[arg(long)]
    pub data: PathBuf,
    /// Skip malformed rows (and report how many) instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Item metadata with categories (RecBole `.item` or TSV `item_id<TAB>a|b`); by default the
    /// `.item` file beside a `.inter` file is used when present.
    #[arg(long)]
    pub item_meta: Option<PathBuf>,
    /// What the log's timestamps count since the Unix epoch: seconds or milliseconds (read into
    /// seconds, the unit of sessions, time gaps and the API).
    #[arg(long, value_enum, default_value_t)]
    pub timestamp_unit: TimestampUnit,
}

impl DataArgs {
    pub fn load(&self) -> anyhow::Result<Vec<Event>> {
        let loaded = load_events(
            &self.data,
            &LoadOptions {
                skip_bad_rows: self.skip_bad_rows,
                format: None,
                timestamp_unit: self.timestamp_unit,
            },
        )?;
        if loaded.skipped_rows > 0 {
            eprintln!(
                "skipped {} malformed rows in {}",
                loaded.skipped_rows,
                self.data.display()
            );
        }
        if loaded.events.is_empty() {
            bail!("{}: no events", self.data.display());
        }
        Ok(loaded.events)
    }

    pub fn load_item_meta(&self) -> anyhow::Result<Option<std::collections::HashMap<String, ItemMeta>>> {
        let sibling = (self.data.extension().is_some_and(|e| e == "inter")).then(|| self.data.with_extension("item"));
        let path = match (&self.item_meta, sibling) {
            (Some(path), _) => path.clone(),
            (None, Some(path)) if path.exists() => path,
            _ => return Ok(None),
        };
        Ok(Some(load_item_meta(&path).with_context(|| {
            format!("reading item metadata {}", path.display())
        })?))
    }
}

pub fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}
