//! `xsrec history`: the durable history store offline — seed it from a log, export it for
//! training, compact it. The server must be stopped (the store admits one process at a time).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::formats::InterWriter;
use crate::history::{EncodedEvents, Journal, JournalConfig};
use crate::recommend::{check_event, MAX_ID_CHARS};

#[derive(Debug, Clone, Subcommand)]
pub enum HistoryCommand {
    /// Append every event of a log (any format `xsrec train` reads) to the store, per user in
    /// file order, as if ingested.
    Import {
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        data: super::DataArgs,
    },
    /// Write the stored events as a RecBole `.inter` file (per user, in arrival order).
    Export {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Only events at or after this Unix time.
        #[arg(long)]
        since: Option<i64>,
    },
    /// Merge the store's files, removing what erasures left behind.
    Compact {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Open the store as a start does (the storage engine's recovery, which cuts a damaged
    /// write-ahead log, included) and read every record: exit 0 when it is readable.
    Check {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// Opens the store in this process once a child has shown it can be read ([`probe`]).
fn open(data_dir: &Path) -> anyhow::Result<Journal> {
    probe(data_dir)?;
    open_here(data_dir)
}

fn open_here(data_dir: &Path) -> anyhow::Result<Journal> {
    Journal::open(JournalConfig::offline(data_dir.to_path_buf()))
        .with_context(|| format!("opening the history store in {}", data_dir.display()))
}

/// Opens the store in a child process (`xsrec history check`) before this one does. Some damage
/// to the storage engine's metadata makes its recovery abort the process (an allocation of tens
/// of GB from a garbled length: tests/store_faults.rs), which no error handling here can catch;
/// in a child it becomes a refusal to start with a message naming the directory.
pub fn probe(data_dir: &Path) -> anyhow::Result<()> {
    if !data_dir.exists() {
        return Ok(());
    }
    // Not damage: refused by the child too, but its message must not send the operator to
    // move a healthy store away.
    if Journal::in_use(data_dir)? {
        anyhow::bail!(
            "the history store in {} is in use by another process (a running `xsrec serve` or \
             `xsrec history` command holds its lock): stop that one first, or give this one \
             another --data-dir",
            data_dir.display()
        );
    }
    let exe = std::env::current_exe().context("locating the xsrec executable")?;
    let check = std::process::Command::new(exe)
        .args(["history", "check", "--data-dir"])
        .arg(data_dir)
        .stdout(std::process::Stdio::null())
        .output()
        .context("running `xsrec history check`")?;
    if check.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&check.stderr);
    let said = said
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(3)
        .collect::<Vec<_>>()
        .join(" / ");
    anyhow::bail!(
        "the history store in {} cannot be read ({}: {said}); it is damaged: restore it from a \
         backup, or move it away to start empty",
        data_dir.display(),
        check.status
    )
}

pub fn run(command: &HistoryCommand) -> anyhow::Result<()> {
    match command {
        HistoryCommand::Import { data_dir, data } => {
            let events = data.load()?;
            for (i, e) in events.iter().enumerate() {
                check_event(
                    format_args!("event {}", i + 1),
                    &e.user_id,
                    &e.item_id,
                    e.timestamp,
                    e.event_type.as_deref(),
                    MAX_ID_CHARS,
                )
                .with_context(|| format!("{}: nothing was imported", data.data.display()))?;
            }
            let journal = open(data_dir)?;
            let started = Instant::now();
            let mut by_user: HashMap<&str, EncodedEvents> = HashMap::new();
            for e in &events {
                let user = by_user.entry(&e.user_id).or_default();
                user.push(e.timestamp, e.event_type.as_deref(), &e.item_id);
            }
            let progress = ProgressBar::new(events.len() as u64).with_style(
                ProgressStyle::with_template("importing {bar:40} {pos}/{len} events ({per_sec}, eta {eta})")
                    .expect("template"),
            );
            let users = by_user.len();
            for (user, logged) in by_user {
                progress.inc(logged.len() as u64);
                if let Some(commit) = journal.append(user, &logged, false) {
                    commit.wait_blocking()?;
                }
            }
            // Everything queued before it is written once this one is.
            journal.compact().wait_blocking()?;
            journal.close();
            progress.finish_and_clear();
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "imported {} events of {users} users into {} in {seconds:.2} s ({:.0} events/s)",
                events.len(),
                data_dir.display(),
                events.len() as f64 / seconds.max(1e-9)
            );
        }
        HistoryCommand::Export { data_dir, out, since } => {
            let journal = open(data_dir)?;
            // User after user, each user's events in arrival order.
            let mut writer = InterWriter::create(out)?;
            let (mut written, mut users) = (0usize, 0usize);
            let mut last_user = String::new();
            let mut failed = Ok(());
            journal.replay(|user, _, events| {
                for e in events.iter().filter(|e| since.is_none_or(|t| e.timestamp >= t)) {
                    if failed.is_ok() {
                        if user != last_user {
                            users += 1;
                            last_user = user.to_owned();
                        }
                        failed = writer.write(user, &e.item_id, e.timestamp, e.event_type.as_deref());
                        written += 1;
                    }
                }
            })?;
            journal.close();
            failed?;
            writer.finish()?;
            eprintln!("exported {written} events of {users} users to {}", out.display());
        }
        HistoryCommand::Check { data_dir } => {
            // This is the probe's child: it opens the store itself.
            let journal = open_here(data_dir)?;
            let mut events = 0usize;
            let entries = journal.replay(|_, _, logged| events += logged.len())?;
            journal.close();
            eprintln!("{}: {entries} entries, {events} events, readable", data_dir.display());
        }
        HistoryCommand::Compact { data_dir } => {
            let journal = open(data_dir)?;
            journal.compact().wait_blocking()?;
            journal.close();
            eprintln!("compacted {}", data_dir.display());
        }
    }
    Ok(())
}
