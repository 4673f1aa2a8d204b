//! The loss curve: training bpb per step (smoothed) and validation bpb, from metrics.jsonl.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

/// Draws `png` from the JSON lines of `metrics`.
pub fn loss_curve(metrics: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("reading {}", metrics.display()))?;
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).context("a metrics line is not JSON")?;
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(bpb) = v["valid_bpb"].as_f64() {
            valid.push((step, bpb));
        } else if let Some(bpb) = v["bpb"].as_f64() {
            train.push((step, bpb));
        }
    }
    let train = smooth(&train, 0.95);
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let x_max = train.iter().chain(&valid).map(|p| p.0).fold(1.0, f64::max);
    let y_max = train.iter().chain(&valid).map(|p| p.1).fold(1.0, f64::max).min(9.0);
    let y_min = train.iter().chain(&valid).map(|p| p.1).fold(y_max, f64::min);

    let root = BitMapBackend::new(png, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("bits per byte", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x_max, (y_min * 0.95)..(y_max * 1.02))?;
    chart.configure_mesh().x_desc("step").y_desc("bpb").label_style(("sans-serif", 14)).draw()?;
    chart
        .draw_series(LineSeries::new(train.iter().copied(), &BLUE))?
        .label("train (smoothed)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(valid.iter().copied(), RED.stroke_width(2)))?
        .label("valid")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart.draw_series(valid.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Exponential moving average with bias correction (as TensorBoard's smoothing).
fn smooth(points: &[(f64, f64)], beta: f64) -> Vec<(f64, f64)> {
    let mut avg = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            avg = beta * avg + (1.0 - beta) * y;
            (x, avg / (1.0 - beta.powi(i as i32 + 1)))
        })
        .collect()
}
