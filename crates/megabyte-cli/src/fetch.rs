//! `megabyte data fetch`: download, verify and split a known data set.

use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use megabyte_data::fetch::{fetch, fetch_from_file, Dataset, FetchEvent};

pub fn run(dataset: Dataset, dir: &Path, from: Option<&Path>) -> Result<()> {
    // Ctrl-C stops the fetch at its next read, which removes its temporary files as it
    // unwinds and ends with an error; a fetch stuck in a read (a stalled server) gets two
    // seconds, then its temporary files are removed and the process exits.
    ctrlc::set_handler(|| {
        megabyte_data::fetch::interrupt();
        std::thread::sleep(std::time::Duration::from_secs(2));
        megabyte_data::fetch::remove_temporaries();
        eprintln!("error: fetch interrupted; its temporary files were removed");
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}").expect("valid template"),
    );
    let mut on_event = |event| match event {
        FetchEvent::Trying { url } => crate::train::say(&bar, format!("trying {url}")),
        FetchEvent::Downloading { bytes_done, bytes_total } => {
            if let Some(total) = bytes_total {
                bar.set_length(total);
            }
            bar.set_position(bytes_done);
        }
        FetchEvent::SourceFailed { url, msg } => crate::train::say(&bar, format!("{url}: {msg}")),
        FetchEvent::Verifying => bar.set_message("verifying checksums"),
        FetchEvent::Extracting { files, bytes } => {
            bar.set_message(format!("unpacking: {files} files, {} MB", bytes / 1_000_000))
        }
        FetchEvent::Writing { file } => bar.set_message(format!("writing {}", file.display())),
        _ => {}
    };
    let report = match from {
        Some(src) => fetch_from_file(dataset, src, dir, &mut on_event),
        None => fetch(dataset, dir, &mut on_event),
    };
    // Ctrl-C ends with 130 whether the fetch noticed it first or the handler's timer did.
    let report = match report {
        Err(e) if megabyte_data::fetch::was_interrupted() => {
            bar.finish_and_clear();
            eprintln!("error: {e}");
            std::process::exit(130);
        }
        other => other?,
    };
    bar.finish_and_clear();
    if report.already_present {
        println!("already present, checksum verified earlier:");
    }
    for file in &report.files {
        if file.path.is_dir() {
            println!("{}/  {} files, {} bytes", file.path.display(), file.files, file.bytes);
        } else {
            println!("{}  {} bytes", file.path.display(), file.bytes);
        }
    }
    Ok(())
}
