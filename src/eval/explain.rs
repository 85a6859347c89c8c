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
    let (left, right) = lower.split_horizontally(700);
    for (i, line) in top.iter().enumerate() {
        left.draw(&Text::new(line.as_str(), (30, 10 + 20 * i as i32), ("sans-serif", 16)))?;
    }
    for (i, (line, boundary)) in recent_history(explanation, 11).iter().enumerate() {
        let color = if *boundary { RED } else { BLACK };
        let style = ("sans-serif", 16).into_font().color(&color);
        right.draw(&Text::new(line.as_str(), (10, 10 + 20 * i as i32), style))?;
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
