//! Training curves as a PNG: loss on the left, validation NDCG@10 on the right.
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::EpochLog;

pub fn draw_curves(epochs: &[EpochLog], best_epoch: usize, path: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (1200, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    draw_panel(&left, "training loss", epochs, best_epoch, |e| e.train_loss, BLUE)?;
    draw_panel(
        &right,
        "validation NDCG@10",
        epochs,
        best_epoch,
        |e| e.validation_ndcg10,
        RED,
    )?;
    root.present()?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    epochs: &[EpochLog],
    best_epoch: usize,
    value: fn(&EpochLog) -> f64,
    color: RGBColor,
) -> anyhow::Result<()> {
    let last_epoch = epochs.last().map_or(1, |e| e.epoch) as f64;
    let (lo, hi) = epochs
        .iter()
        .map(value)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let margin = ((hi - lo) * 0.05).max(1e-6);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(1f64..last_epoch.max(2.0), (lo - margin)..(hi + margin))?;
    chart.configure_mesh().x_desc("epoch").draw()?;
    chart.draw_series(LineSeries::new(
        epochs.iter().map(|e| (e.epoch as f64, value(e))),
        color.stroke_width(2),
    ))?;
    if let Some(best) = epochs.iter().find(|e| e.epoch == best_epoch) {
        chart.draw_series(std::iter::once(Circle::new(
            (best.epoch as f64, value(best)),
            5,
            color.filled(),
        )))?;
    }
    Ok(())
}
