//! `megabyte export` and `megabyte import`: a checkpoint as a Hugging Face-style folder
//! (config.json, model.safetensors, modeling_megabyte.py) for PyTorch, and such a folder back
//! as a checkpoint. The format and its checks are the library's `megabyte::export`.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// A checkpoint folder, or a run folder (its newest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The folder to write: config.json, model.safetensors and modeling_megabyte.py.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing export in --out (a folder holding only those three files).
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// A folder written by `megabyte export`, or by `save_pretrained` of its
    /// modeling_megabyte.py after training in PyTorch.
    hf_dir: PathBuf,
    /// The checkpoint folder to write (config.json and model.safetensors), for `eval`,
    /// `generate` and `serve`.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing model checkpoint in --out (a folder holding only those two files).
    #[arg(long)]
    overwrite: bool,
}

pub fn export(args: ExportArgs) -> Result<()> {
    megabyte::export::export(&args.checkpoint, &args.out, args.overwrite)
        .with_context(|| format!("exporting {} to {}", args.checkpoint.display(), args.out.display()))?;
    eprintln!(
        "wrote {}: config.json, model.safetensors, modeling_megabyte.py (load with MegabyteForCausalLM.from_pretrained)",
        args.out.display()
    );
    Ok(())
}

pub fn import(args: ImportArgs) -> Result<()> {
    let imported = megabyte::export::import(&args.hf_dir).with_context(|| format!("importing {}", args.hf_dir.display()))?;
    for note in &imported.notes {
        eprintln!("note: {note}");
    }
    megabyte::checkpoint::save_model(&args.out, &imported.config, &imported.params, args.overwrite)
        .with_context(|| format!("writing the checkpoint {}", args.out.display()))?;
    eprintln!(
        "wrote the checkpoint {} ({} parameters); use it with --checkpoint {}",
        args.out.display(),
        imported.params.count(),
        args.out.display()
    );
    Ok(())
}
