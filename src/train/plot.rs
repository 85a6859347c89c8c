//! Training curves as a PNG: loss and validation NDCG@10 by epoch, and validation NDCG@10 by
//! training time (time to quality, what a machine budget buys).
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::EpochLog;

/// One panel: what is drawn against what.
struct Panel {
    title: &'static str,
    x_desc: &'static str,
    x: fn(&EpochLog) -> f64,
    y: fn(&EpochLog) -> f64,
    color: RGBColor,
}

pub fn draw_curves(epochs: &[EpochLog], best_epoch: usize, path: &Path) -> anyhow::Result<()> {
    let panels = [
        Panel {
            title: "training loss",
            x_desc: "epoch",
            x: |e| e.epoch as f64,
            y: |e| e.train_loss,
            color: BLUE,
        },
        Panel {
            title: "validation NDCG@10",
            x_desc: "epoch",
            x: |e| e.epoch as f64,
            y: |e| e.validation_ndcg10,
            color: RED,
        },
        Panel {
            title: "validation NDCG@10 by training time",
            x_desc: "minutes",
            x: |e| e.elapsed_secs / 60.0,
            y: |e| e.validation_ndcg10,
            color: MAGENTA,
        },
    ];
    let root = BitMapBackend::new(path, (600 * panels.len() as u32, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    for (area, panel) in root.split_evenly((1, panels.len())).iter().zip(&panels) {
        draw_panel(area, panel, epochs, best_epoch)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    panel: &Panel,
    epochs: &[EpochLog],
    best_epoch: usize,
) -> anyhow::Result<()> {
    let span = |value: fn(&EpochLog) -> f64| {
        let (lo, hi) = epochs
            .iter()
            .map(value)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let margin = ((hi - lo) * 0.05).max(1e-6);
        (lo - margin)..(hi + margin)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(span(panel.x), span(panel.y))?;
    chart.configure_mesh().x_desc(panel.x_desc).draw()?;
    let point = |e: &EpochLog| ((panel.x)(e), (panel.y)(e));
    chart.draw_series(LineSeries::new(epochs.iter().map(point), panel.color.stroke_width(2)))?;
    if let Some(best) = epochs.iter().find(|e| e.epoch == best_epoch) {
        chart.draw_series(std::iter::once(Circle::new(point(best), 5, panel.color.filled())))?;
    }
    Ok(())
}
