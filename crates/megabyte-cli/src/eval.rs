//! `megabyte eval`: bits-per-byte of a checkpoint over every byte of a file or folder.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use megabyte::data::{ByteStream, Split};
use megabyte::eval::{evaluate, EvalSettings};
use megabyte::DType;

use crate::args::DeviceArgs;

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint folder, or a run folder (its newest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The bytes to score: a file or a folder of files.
    #[arg(long)]
    data: PathBuf,
    /// Score each document on its own (see `megabyte train --documents`): windows start inside
    /// it and never see the bytes before its start.
    #[arg(long)]
    documents: bool,
    /// Strided inference (paper §2.3): a second pass offset by P/2; 2× cost.
    #[arg(long)]
    strided: bool,
    /// Sliding windows advancing by STRIDE bytes, scoring only the last STRIDE of each.
    #[arg(long, value_name = "STRIDE")]
    sliding: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: Args) -> Result<()> {
    let (device, precision) = args.device.open()?;
    let dir = megabyte::checkpoint::resolve(&args.checkpoint)?;
    let (model, _) = megabyte::checkpoint::load_model(&dir, DType::F32, &device)?;
    let model = model.with_activations(precision.dtype());
    let stream = Arc::new(ByteStream::open(&args.data)?);
    let split = if args.documents {
        let starts = stream.documents()?;
        Split::all(stream).with_documents(&starts)
    } else {
        Split::all(stream)
    };
    let settings = EvalSettings { strided: args.strided, sliding: args.sliding, batch_size: args.batch_size };
    let bar = if args.json { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(ProgressStyle::with_template("{wide_bar} {pos}/{len} windows ETA {eta}").expect("valid template"));
    let report = evaluate(&model, &split, settings, None, &device, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    if args.json {
        let out = serde_json::json!({
            "bpb": report.bpb,
            "bytes": report.bytes,
            "windows": report.windows,
            "checkpoint": dir,
            "data": args.data,
            "strided": args.strided,
            "sliding": args.sliding,
            "documents": split.documents().map(|d| d.len()),
            "context": model.config().context,
            "patch_size": model.config().patch_size,
            "by_patch_position": report.by_patch_position,
            "by_window_position": report.by_window_position,
        });
        println!("{out}");
    } else {
        println!(
            "bpb {:.3} over {} bytes ({} windows of {} bytes{}{}{})",
            report.bpb,
            report.bytes,
            report.windows,
            model.config().context,
            args.sliding.map_or(String::new(), |s| format!(", sliding stride {s}")),
            if args.strided { ", strided" } else { "" },
            split.documents().map_or(String::new(), |d| format!(", {} documents in isolation", d.len())),
        );
        let row = |slices: &[megabyte::eval::Slice], label: &dyn Fn(&megabyte::eval::Slice) -> String| {
            slices.iter().filter_map(|s| Some(format!("{} {:.3}", label(s), s.bpb?))).collect::<Vec<_>>().join(", ")
        };
        if report.by_patch_position.len() > 1 {
            println!("by position in the patch: {}", row(&report.by_patch_position, &|s| s.from.to_string()));
        }
        println!("by position in the window: {}", row(&report.by_window_position, &|s| format!("{}-{}", s.from, s.to - 1)));
    }
    Ok(())
}
