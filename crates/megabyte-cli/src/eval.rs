//! `megabyte eval`: bits-per-byte of a checkpoint over every byte of a file or folder.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use megabyte::data::{ByteStream, Split};
use megabyte::eval::{evaluate, EvalSettings};
use megabyte::{DType, Device, MegaByte, Tensor, V};

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
    /// Also write the logits of every plain window to this NumPy file: float32
    /// [windows, T, 256], where [w, t] predicts byte t of window w (bytes w·T + t of the data)
    /// from the bytes before it; the last window is zero-padded past the data's end. Not with
    /// --strided, --sliding or --documents.
    #[arg(long, value_name = "OUT.npy")]
    logits: Option<PathBuf>,
    /// Replace an existing --logits file.
    #[arg(long, requires = "logits")]
    overwrite: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(path) = &args.logits {
        if args.strided || args.sliding.is_some() || args.documents {
            bail!("--logits writes the logits of plain windows; leave out --strided, --sliding and --documents");
        }
        if !args.overwrite && path.symlink_metadata().is_ok() {
            bail!("{} already exists: pass --overwrite to replace it, or choose another --logits path", path.display());
        }
    }
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
    if let Some(path) = &args.logits {
        write_logits(&model, &split, args.batch_size, &device, path).with_context(|| format!("writing the logits to {}", path.display()))?;
    }
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

/// The logits of every plain window of `split` as a NumPy file (float32 [W, T, V]), written
/// a batch at a time into a temporary file beside `path` that is renamed into place at the end.
fn write_logits(model: &MegaByte, split: &Split, batch: usize, device: &Device, path: &Path) -> Result<()> {
    let t = model.config().context;
    let windows = megabyte::eval::windows(split.len(), t, model.config().patch_size, t, &[0], false);
    let name = path.file_name().context("--logits names no file")?.to_string_lossy().into_owned();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        out.write_all(&npy_header(&[windows.len(), t, V]))?;
        for chunk in windows.chunks(batch.max(1)) {
            let mut ids: Vec<u32> = Vec::with_capacity(chunk.len() * t);
            for w in chunk {
                ids.extend(split.padded_window(w.start, w.len, t)?.into_iter().map(u32::from));
            }
            let x = Tensor::from_vec(ids, (chunk.len(), t), device)?; // [B, T]
            let logits = model.logits(&x)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?; // [B·T·V]
            out.write_all(&logits.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The header of a NumPy .npy file (format 1.0) of little-endian float32 in C order.
fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // magic (6) + version (2) + length (2) + dict + newline, padded to a multiple of 64
    let total = (10 + dict.len() + 1).div_ceil(64) * 64;
    dict.push_str(&" ".repeat(total - 10 - dict.len() - 1));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}
