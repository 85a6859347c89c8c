//! The "why" picture: which past events the newest position attends to, per layer.
use std::path::Path;

use plotters::prelude::*;

/// What to draw for one user.
pub struct Explanation {
    /// Items of the history window (their names: titles where known), oldest first.
    pub history: Vec<String>,
    /// Session index of each history event (a boundary is drawn where it changes).
    pub sessions: Vec<i64>,
    /// Per layer, attention weight of the newest position over each history event.
    pub attention: Vec<Vec<f32>>,
    /// Recommended items (names) with scores, best first.
    pub top: Vec<(String, f32)>,
    pub title: String,
}

/// How much attention one session of the window receives from the newest position.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionShare {
    /// 0 for the newest session, 1 for the one before, …
    pub sessions_ago: usize,
    pub events: usize,
    /// Per layer, the summed attention weight of the session's events.
    pub per_layer: Vec<f32>,
}

impl Explanation {
    /// The sessions of the window, oldest first, with the attention each receives.
    pub fn session_attention(&self) -> Vec<SessionShare> {
        let mut shares: Vec<SessionShare> = Vec::new();
        for (i, session) in self.sessions.iter().enumerate() {
            if i == 0 || self.sessions[i - 1] != *session {
                shares.push(SessionShare {
                    sessions_ago: 0,
                    events: 0,
                    per_layer: vec![0.0; self.attention.len()],
                });
            }
            let share = shares.last_mut().expect("pushed above");
            share.events += 1;
            for (total, layer) in share.per_layer.iter_mut().zip(&self.attention) {
                *total += layer[i];
            }
        }
        let count = shares.len();
        for (i, share) in shares.iter_mut().enumerate() {
            share.sessions_ago = count - 1 - i;
        }
        shares
    }

    /// One line per session, newest first, at most `lines` (the heading included).
    pub fn session_attention_lines(&self, lines: usize) -> Vec<String> {
        let layers: Vec<String> = (1..=self.attention.len()).map(|l| format!("layer {l}")).collect();
        let mut out = vec![format!("attention per session ({}):", layers.join(" | "))];
        for share in self.session_attention().iter().rev().take(lines.saturating_sub(1)) {
            let when = match share.sessions_ago {
                0 => "current session".to_string(),
                1 => "1 session ago".to_string(),
                n => format!("{n} sessions ago"),
            };
            let weights: Vec<String> = share.per_layer.iter().map(|w| format!("{:.0}%", 100.0 * w)).collect();
            let noun = if share.events == 1 { "event" } else { "events" };
            out.push(format!("{when}, {} {noun}: {}", share.events, weights.join(" | ")));
        }
        out
    }
}

pub fn draw_attention(explanation: &Explanation, path: &Path) -> anyhow::Result<()> {
    let n = explanation.history.len().max(1);
    let layers = explanation.attention.len().max(1);
    let root = BitMapBackend::new(path, (1400, 180 + 60 * layers as u32 + 240)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(120 + 60 * layers as u32);
    let mut chart = ChartBuilder::on(&upper)
        .caption(&explanation.title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        // Rows are centred on integers so that the y labels name them.
        .build_cartesian_2d(0f64..n as f64, -0.5f64..layers as f64 - 0.5)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("history position (oldest → newest); red lines = session boundaries")
        .y_labels(layers)
        .y_label_formatter(&|y| {
            if y.fract().abs() < 1e-9 {
                format!("layer {}", *y as usize + 1)
            } else {
                String::new()
            }
        })
        .draw()?;
    for (layer, weights) in explanation.attention.iter().enumerate() {
        // Normalised per layer so that each row uses the full colour range.
        let max = weights.iter().copied().fold(f32::MIN_POSITIVE, f32::max);
        chart.draw_series(weights.iter().enumerate().map(|(i, &w)| {
            let heat = (w / max).clamp(0.0, 1.0) as f64;
            let color = RGBColor((255.0 * (1.0 - heat)) as u8, (255.0 * (1.0 - 0.6 * heat)) as u8, 255);
            Rectangle::new(
                [(i as f64, layer as f64 - 0.5), (i as f64 + 1.0, layer as f64 + 0.5)],
                color.filled(),
            )
        }))?;
    }
    let boundaries = explanation
        .sessions
        .windows(2)
        .enumerate()
        .filter(|(_, pair)| pair[0] != pair[1])
        .map(|(i, _)| i + 1);
    for boundary in boundaries {
        chart.draw_series(LineSeries::new(
            [(boundary as f64, -0.5), (boundary as f64, layers as f64 - 0.5)],
            RED.stroke_width(2),
        ))?;
    }
    let mut top = vec!["top-10 recommendations:".to_string()];
    top.extend(
        explanation
            .top
            .iter()
            .enumerate()
            .map(|(i, (item, score))| format!("{:>2}. {item}  (score {score:.3})", i + 1)),
    );
    let (left, rest) = lower.split_horizontally(520);
    let (middle, right) = rest.split_horizontally(460);
    for (i, line) in top.iter().enumerate() {
        left.draw(&Text::new(line.as_str(), (30, 10 + 20 * i as i32), ("sans-serif", 16)))?;
    }
    for (i, (line, boundary)) in recent_history(explanation, 11).iter().enumerate() {
        let color = if *boundary { RED } else { BLACK };
        let style = ("sans-serif", 16).into_font().color(&color);
        middle.draw(&Text::new(line.as_str(), (10, 10 + 20 * i as i32), style))?;
    }
    for (i, line) in explanation.session_attention_lines(11).iter().enumerate() {
        right.draw(&Text::new(line.as_str(), (10, 10 + 20 * i as i32), ("sans-serif", 16)))?;
    }
    root.present()?;
    Ok(())
}

/// The newest events of the history in `lines` lines at most, newest first, with a line where a
/// session starts (`true` marks those lines).
fn recent_history(explanation: &Explanation, lines: usize) -> Vec<(String, bool)> {
    let mut shown = vec![("recent history, newest first:".to_string(), false)];
    for at in (0..explanation.history.len()).rev() {
        if shown.len() >= lines {
            break;
        }
        shown.push((explanation.history[at].clone(), false));
        let starts_session = at > 0 && explanation.sessions.get(at) != explanation.sessions.get(at - 1);
        if starts_session && shown.len() < lines {
            shown.push(("── a new session starts above ──".to_string(), true));
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_is_summed_per_session_newest_counted_from_zero() {
        let explanation = Explanation {
            history: vec![String::new(); 6],
            sessions: vec![0, 0, 1, 1, 1, 2],
            attention: vec![vec![0.1, 0.1, 0.2, 0.2, 0.1, 0.3], vec![0.0, 0.5, 0.0, 0.0, 0.0, 0.5]],
            top: Vec::new(),
            title: String::new(),
        };
        let shares = explanation.session_attention();
        let summary: Vec<(usize, usize)> = shares.iter().map(|s| (s.sessions_ago, s.events)).collect();
        assert_eq!(summary, [(2, 2), (1, 3), (0, 1)]);
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(&shares[0].per_layer, &[0.2, 0.5]));
        assert!(close(&shares[1].per_layer, &[0.5, 0.0]));
        assert!(close(&shares[2].per_layer, &[0.3, 0.5]));
        assert_eq!(
            explanation.session_attention_lines(3),
            [
                "attention per session (layer 1 | layer 2):",
                "current session, 1 event: 30% | 50%",
                "1 session ago, 3 events: 50% | 0%",
            ]
        );
    }
}
