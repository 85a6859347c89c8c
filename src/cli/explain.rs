//! `xsrec explain`: attention heatmap and top-10 for one user, items named by title when the
//! item metadata has titles.
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use tch::Kind;

use super::{parse_device, DataArgs};
use crate::data::session::starts_new_session;
use crate::data::split::build_sequences;
use crate::eval::explain::{draw_attention, Explanation};
use crate::model::{encode, item_indices, mask_items, Artifact, Batch, HistoryView, Scorer};

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// External user id.
    #[arg(long)]
    pub user: String,
    /// Moment of prediction (Unix seconds); defaults to the user's last event time.
    #[arg(long)]
    pub at: Option<i64>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: &ExplainArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let artifact = Artifact::load(&args.model, device)?;
    let events = args.data.load()?;
    let meta = args.data.load_item_meta()?;
    let title_of = |id: &str| meta.as_ref().and_then(|m| m.get(id)).and_then(|m| m.title.as_deref());
    // "Toy Story [1]" with a title, the bare id without.
    let name = |id: &str| match title_of(id) {
        Some(title) => format!("{title} [{id}]"),
        None => id.to_owned(),
    };
    let set = build_sequences(&events, artifact.items.clone(), artifact.event_types.clone(), false);
    let Some(user) = set.users.iter().find(|u| u.user_id == args.user) else {
        bail!(
            "user `{}` has no events with items the model knows in {}",
            args.user,
            args.data.data.display()
        );
    };
    let model = &artifact.model;
    let (max_len, gap) = (model.config.max_len, model.config.session_gap_secs);
    let history = HistoryView::new(&user.items, &user.timestamps, &user.types);
    let at = args.at.unwrap_or(*user.timestamps.last().expect("non-empty"));
    let row = encode(history, at, max_len, gap);
    let batch = Batch::new(std::slice::from_ref(&row), device);
    let attention = model.last_position_attention(&batch);
    if attention.is_empty() {
        bail!("explain needs a Transformer model; this one is {:?}", model.config.arch);
    }
    let seen = item_indices(&user.items);
    let (scores, items) =
        mask_items(model.score_next(&batch, &[&user.items]).to_kind(Kind::Float), &[seen]).topk(10, 1, true, true);
    let top: Vec<(String, f32)> = Vec::<i64>::try_from(items.view(-1))?
        .into_iter()
        .zip(Vec::<f32>::try_from(scores.view(-1))?)
        .map(|(i, s)| (artifact.items.id(i as u32).to_owned(), s))
        .collect();
    let start = max_len - history.len().min(max_len);
    let pause = at - user.timestamps.last().expect("non-empty");
    let moment = format!(
        "predicting {} after the newest event: {}",
        duration_words(pause),
        match starts_new_session(pause, gap) {
            true => "the start of a new session",
            false => "the newest session continues",
        }
    );
    let explanation = Explanation {
        history: row.items[start..]
            .iter()
            .map(|&i| name(artifact.items.id(i as u32)))
            .collect(),
        sessions: row.sessions[start..].to_vec(),
        attention: attention.into_iter().map(|w| w[start..].to_vec()).collect(),
        top: top.iter().map(|(id, score)| (name(id), *score)).collect(),
        title: format!(
            "user {}: attention of the newest position ({} events, heads averaged); {moment}",
            args.user,
            history.len().min(max_len)
        ),
    };
    draw_attention(&explanation, &args.out).with_context(|| format!("drawing {}", args.out.display()))?;
    // The top-10 on stdout stays machine-readable; the session summary is for the reader.
    eprintln!("{moment}");
    for line in explanation.session_attention_lines(usize::MAX) {
        eprintln!("{line}");
    }
    for (rank, (item, score)) in top.iter().enumerate() {
        println!(
            "{}\t{item}\t{score:.4}\t{}",
            rank + 1,
            title_of(item).unwrap_or_default()
        );
    }
    Ok(())
}

/// "45 s", "12 min", "3.5 h", "4.2 days": a pause as a reader takes it in.
fn duration_words(secs: i64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{:.1} h", s as f64 / 3600.0),
        s => format!("{:.1} days", s as f64 / 86_400.0),
    }
}

#[cfg(test)]
mod tests {
    use super::duration_words;

    #[test]
    fn pauses_read_in_the_unit_that_fits() {
        assert_eq!(duration_words(0), "0 s");
        assert_eq!(duration_words(59), "59 s");
        assert_eq!(duration_words(61), "1 min");
        assert_eq!(duration_words(5400), "1.5 h");
        assert_eq!(duration_words(3 * 86_400 + 43_200), "3.5 days");
    }
}
