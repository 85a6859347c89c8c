//! Human- and machine-readable evaluation output.
use std::io::Write;
use std::path::Path;

use super::{CaseResult, SplitMetrics};
use crate::data::split::SequenceSet;

/// Columns shown in markdown tables.
pub const TABLE_METRICS: [&str; 9] = [
    "HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR", "AUC",
];

/// A markdown table with one row per (name, metrics) pair, split rows included.
pub fn markdown_table(rows: &[(String, &SplitMetrics)]) -> String {
    let mut out = format!("| model | subset | users | {} |\n", TABLE_METRICS.join(" | "));
    out += &format!("|---|---|---:|{}\n", "---:|".repeat(TABLE_METRICS.len()));
    for (name, split) in rows {
        for (subset, m) in [
            ("all", &split.all),
            ("new session", &split.new_session),
            ("same session", &split.same_session),
        ] {
            let values: Vec<String> = TABLE_METRICS.iter().map(|k| format!("{:.4}", m.get(k))).collect();
            out += &format!("| {name} | {subset} | {} | {} |\n", m.cases, values.join(" | "));
        }
    }
    out
}

/// Per user: external user id, then the top items' external ids, best first, tab-separated.
pub fn write_predictions(path: &Path, set: &SequenceSet, results: &[CaseResult]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in results {
        write!(out, "{}", set.users[r.user].user_id)?;
        for &(item, _) in &r.top {
            write!(out, "\t{}", set.items.id(item as u32))?;
        }
        writeln!(out)?;
    }
    out.flush()
}
