//! Batch time against batch size, beside the floor, as a log-log PNG.
use std::path::Path;

use plotters::prelude::*;

use super::forward::ForwardRow;

/// A line of the chart: its legend, how to read it off a row, its colour.
type Series = (&'static str, fn(&ForwardRow) -> f64, RGBColor);

pub fn draw_forward(rows: &[ForwardRow], title: &str, path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(!rows.is_empty(), "no batch sizes to draw");
    let series: [Series; 4] = [
        ("device time (copy in → winners out)", |r| r.device_ms, BLUE),
        ("encoder", |r| r.forward_ms, GREEN),
        ("scores + top-k + copy out", |r| r.rank_out_ms, MAGENTA),
        ("floor (FLOPs ÷ rate, bytes ÷ bandwidth)", |r| r.floor_ms, BLACK),
    ];
    let values = rows.iter().flat_map(|r| series.iter().map(move |(_, get, _)| get(r)));
    let (lo, hi) = values
        .filter(|v| *v > 0.0)
        .fold((f64::INFINITY, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let largest = rows.iter().map(|r| r.batch_size).max().unwrap_or(1) as f64;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1f64..largest.max(2.0)).log_scale(), (lo / 1.5..hi * 1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("batch size (requests)")
        .y_desc("ms per batch")
        .draw()?;
    for (name, get, color) in series {
        let points: Vec<(f64, f64)> = rows.iter().map(|r| (r.batch_size as f64, get(r))).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
