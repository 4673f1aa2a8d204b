//! `megabyte data fetch`: download, verify and split a known data set.

use std::path::Path;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use megabyte::fetch::{fetch, fetch_enwik8_from_file_with_progress, Dataset, FetchEvent};

pub fn run(name: &str, dir: &Path, from: Option<&Path>) -> Result<()> {
    let dataset = Dataset::parse(name)?;
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
        FetchEvent::Verifying => bar.set_message("verifying md5"),
        FetchEvent::Writing { file } => bar.set_message(format!("writing {}", file.display())),
        _ => {}
    };
    let report = match (dataset, from) {
        (Dataset::Enwik8, Some(src)) => fetch_enwik8_from_file_with_progress(src, dir, &mut on_event)?,
        (_, None) => fetch(dataset, dir, &mut on_event)?,
    };
    bar.finish_and_clear();
    if report.already_present {
        println!("already present, checksum verified earlier:");
    }
    for file in &report.files {
        println!("{}  {} bytes", file.path.display(), file.bytes);
    }
    Ok(())
}
