//! `megabyte data images|audio|code`: turn images, WAV clips and source folders into one byte
//! file to train on, with its document index beside it. One library call each.

use std::path::Path;

use anyhow::Result;
use megabyte_data::image::PixelOrder;

pub fn images(input: &Path, output: &Path, order: PixelOrder) -> Result<()> {
    let r = megabyte_data::image::convert_images(input, output, order)?;
    let order = match order {
        PixelOrder::Raster => "raster order".to_string(),
        PixelOrder::PatchScan { block } => format!("patch-scan order, {block}×{block} blocks ({} bytes each)", block * block * r.shape.channels),
    };
    println!("{}: {} images of {} ({} bytes each) in {order}, {} bytes", r.output.display(), r.images, r.shape, r.shape.bytes(), r.bytes);
    println!("document index: {}", r.index.display());
    Ok(())
}

pub fn audio(input: &Path, output: &Path) -> Result<()> {
    let r = megabyte_data::audio::convert_audio(input, output)?;
    println!(
        "{}: {} clips, {}, {:.1} s, {} bytes ({}-byte frames)",
        r.output.display(),
        r.clips,
        r.format,
        r.seconds,
        r.bytes,
        r.format.frame_bytes()
    );
    println!("document index: {}", r.index.display());
    Ok(())
}

pub fn code(folder: &Path, output: &Path, ext: &[String]) -> Result<()> {
    let ext: Vec<String> = if ext.is_empty() {
        megabyte_data::code::DEFAULT_EXTENSIONS.iter().map(|e| e.to_string()).collect()
    } else {
        ext.to_vec()
    };
    let r = megabyte_data::code::join_code(folder, output, &ext)?;
    println!("{}: {} files, {} bytes, each after one 0x00 byte", r.output.display(), r.files, r.bytes);
    println!("document index: {}", r.index.display());
    Ok(())
}
