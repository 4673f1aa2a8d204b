//! Plots: the loss curve of a run (training bpb per step, smoothed, and validation bpb, from
//! metrics.jsonl), and `megabyte plot`, numeric fields of JSON-lines records against another
//! (a bench sweep over context lengths or GPU counts).

use std::path::{Path, PathBuf};

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

#[derive(clap::Args)]
pub struct Args {
    /// JSON-lines file: one record per line (e.g. `megabyte bench --jsonl` output).
    input: PathBuf,
    /// The field on the x axis.
    #[arg(long)]
    x: String,
    /// A field on the y axis; give several for one panel each, side by side.
    #[arg(long, required = true)]
    y: Vec<String>,
    /// One line per distinct value of this field (e.g. preset).
    #[arg(long)]
    by: Option<String>,
    /// Logarithmic x axis.
    #[arg(long)]
    log_x: bool,
    /// Logarithmic y axes.
    #[arg(long)]
    log_y: bool,
    /// The PNG to write.
    #[arg(long)]
    out: PathBuf,
}

/// A series: its label and (x, y) points sorted by x.
type Series = (String, Vec<(f64, f64)>);

pub fn run(args: Args) -> Result<()> {
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let records: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {} is not JSON", args.input.display(), i + 1)))
        .collect::<Result<_>>()?;
    let panels: Vec<Vec<Series>> = args.y.iter().map(|y| series(&records, &args.x, y, args.by.as_deref(), args.log_x, args.log_y)).collect();
    if panels.iter().all(|p| p.iter().all(|s| s.1.is_empty())) {
        anyhow::bail!("no record of {} has numeric `{}` and {}", args.input.display(), args.x, args.y.iter().map(|y| format!("`{y}`")).collect::<Vec<_>>().join(" or "));
    }
    // Every axis is checked before the PNG is created: the bitmap backend writes its file
    // when dropped, so a refusal after it would leave a blank image behind.
    let axes: Vec<Axes> = panels.iter().zip(&args.y).map(|(panel, y)| axes(panel, &args.x, y, args.log_x, args.log_y)).collect::<Result<_>>()?;
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let root = BitMapBackend::new(&args.out, (560 * panels.len() as u32, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    for (((area, y), panel), axes) in root.split_evenly((1, panels.len())).iter().zip(&args.y).zip(&panels).zip(&axes) {
        draw_panel(area, &args.x, y, panel, *axes, args.log_x, args.log_y)?;
    }
    root.present()?;
    Ok(())
}

/// The records' (x, y) points where both fields are numbers, grouped by `by`. Points that no
/// axis can show (a value that is not finite, or not positive on a log axis) are left out,
/// with a note saying how many.
fn series(records: &[serde_json::Value], x: &str, y: &str, by: Option<&str>, log_x: bool, log_y: bool) -> Vec<Series> {
    let drawable = |v: f64, log: bool| v.is_finite() && (!log || v > 0.0);
    let mut out: Vec<Series> = Vec::new();
    let mut left_out = 0;
    for r in records {
        let (Some(px), Some(py)) = (r[x].as_f64(), r[y].as_f64()) else { continue };
        if !drawable(px, log_x) || !drawable(py, log_y) {
            left_out += 1;
            continue;
        }
        let label = by.map(|b| r[b].as_str().map(str::to_string).unwrap_or_else(|| r[b].to_string())).unwrap_or_default();
        match out.iter_mut().find(|s| s.0 == label) {
            Some(s) => s.1.push((px, py)),
            None => out.push((label, vec![(px, py)])),
        }
    }
    if left_out > 0 {
        let positive = if log_x || log_y { " and positive on a log axis" } else { "" };
        eprintln!("note: {left_out} record(s) left out of the `{y}` panel: `{x}` and `{y}` must be finite{positive}");
    }
    for s in &mut out {
        s.1.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// A panel's x and y axis ranges.
type Axes = ((f64, f64), (f64, f64));

/// The axis ranges of a panel, or an error when one cannot be drawn.
fn axes(series: &[Series], x: &str, y: &str, log_x: bool, log_y: bool) -> Result<Axes> {
    let points = || series.iter().flat_map(|s| s.1.iter());
    let xs = bounds(points().map(|p| p.0), log_x);
    let ys = bounds(points().map(|p| p.1), log_y);
    check_axis(x, "--log-x", points().map(|p| p.0), xs, log_x)?;
    check_axis(y, "--log-y", points().map(|p| p.1), ys, log_y)?;
    Ok((xs, ys))
}

/// Refuses an axis range that plotters cannot place tick marks on. It spaces them by the
/// span (linear) or by the ratio of the ends (log), and loops forever once that overflows
/// to infinity: values of ±1e308, or a log axis over more than about 300 powers of ten.
fn check_axis(field: &str, log_flag: &str, values: impl Iterator<Item = f64>, (lo, hi): (f64, f64), log: bool) -> Result<()> {
    let drawable = if log { lo > 0.0 && (hi / lo).is_finite() } else { (hi - lo).is_finite() };
    if !drawable {
        let (min, max) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        let (what, fix) = if log {
            ("more than about 300 powers of ten, which a log axis cannot show", format!("leave out the records far from the rest or drop {log_flag}"))
        } else {
            ("a span larger than the largest number, which an axis cannot show", "leave out the records far from the rest".to_string())
        };
        anyhow::bail!("cannot draw `{field}`: its values run from {min:e} to {max:e}, {what}; {fix}");
    }
    Ok(())
}

fn draw_panel(area: &DrawingArea<BitMapBackend, plotters::coord::Shift>, x: &str, y: &str, series: &[Series], ((x0, x1), (y0, y1)): Axes, log_x: bool, log_y: bool) -> Result<()> {
    // Ten colours told apart at a glance (Tableau 10), so a comparison of up to ten runs
    // never reuses one.
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    let mut builder = ChartBuilder::on(area);
    builder.caption(y, ("sans-serif", 20)).margin(14).x_label_area_size(40).y_label_area_size(64);
    // The four axis combinations are four chart types; one macro draws them all alike.
    macro_rules! draw {
        ($xr:expr, $yr:expr) => {{
            let mut chart = builder.build_cartesian_2d($xr, $yr)?;
            chart.configure_mesh().x_desc(x).y_desc(y).label_style(("sans-serif", 13)).draw()?;
            for (i, (label, pts)) in series.iter().enumerate() {
                let color = colors[i % colors.len()];
                let line = chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
                if !label.is_empty() {
                    line.label(label.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
                }
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            }
            if series.iter().any(|s| !s.0.is_empty()) {
                chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).label_font(("sans-serif", 13)).background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
            }
        }};
    }
    match (log_x, log_y) {
        (false, false) => draw!(x0..x1, y0..y1),
        (true, false) => draw!((x0..x1).log_scale(), y0..y1),
        (false, true) => draw!(x0..x1, (y0..y1).log_scale()),
        (true, true) => draw!((x0..x1).log_scale(), (y0..y1).log_scale()),
    }
    Ok(())
}

/// An axis range covering the values with a margin (positive, for a log axis). It hugs the
/// data rather than reaching down to zero, so that curves ending close together (validation
/// losses) stay apart, but does not dip below zero for values that do not.
fn bounds(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| !log || *v > 0.0).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (if log { 1.0 } else { 0.0 }, 1.0);
    }
    // The margins stop at the largest finite number, so that values near it still get an
    // axis (`check_axis` refuses the spans that overflow all the same).
    if log {
        (lo / 1.5, (hi * 1.5).min(f64::MAX))
    } else {
        let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.01).max(1e-9);
        (if lo >= 0.0 { (lo - pad).max(0.0) } else { (lo - pad).max(f64::MIN) }, (hi + pad).min(f64::MAX))
    }
}

#[cfg(test)]
mod tests {
    /// The loss curve's axes stay finite whatever the metrics hold (its y axis stops at 9
    /// bits per byte), so it draws extreme records instead of hanging in the tick marks.
    #[test]
    fn loss_curve_of_extreme_records_is_drawn() {
        let dir = std::env::temp_dir().join(format!("megabyte-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let metrics = dir.join("metrics.jsonl");
        let lines = [r#"{"step": 1, "bpb": 1e308}"#, r#"{"step": 1.79e308, "bpb": -1.79e308}"#, r#"{"step": 2, "valid_bpb": 1e-300}"#];
        std::fs::write(&metrics, lines.join("\n")).unwrap();
        let png = dir.join("loss.png");
        let (send, done) = std::sync::mpsc::channel();
        let (m, p) = (metrics.clone(), png.clone());
        std::thread::spawn(move || send.send(super::loss_curve(&m, &p).map_err(|e| e.to_string())));
        let result = done.recv_timeout(std::time::Duration::from_secs(30)).expect("loss_curve did not return within 30 s");
        result.unwrap();
        assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
