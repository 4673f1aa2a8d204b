//! What the training bytes are, when they are images or audio: `train --image WxHxC` (with
//! `--order`/`--block`) or `--audio RATE:BITS:CHANNELS` records it as `RUN/media.json`, beside
//! the checkpoints and outside the model config (a run without one is plain bytes), and
//! `serve` shows it to the playground, which draws the image or plays the clip.

use std::path::Path;

use anyhow::{bail, Context, Result};
use megabyte_data::audio::PcmFormat;
use megabyte_data::image::{ImageShape, PixelOrder};
use serde::{Deserialize, Serialize};

use crate::args::PixelOrderArgs;

/// The record's file name in a run folder (or a checkpoint folder, for a copied checkpoint).
pub const MEDIA_FILE: &str = "media.json";

/// The data's media, as saved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Media {
    /// Images of `width`×`height`×`channels` bytes each, pixels in `order` (`raster`, or
    /// `patch_scan` in `block`×`block` blocks).
    Image { width: usize, height: usize, channels: usize, order: String, block: Option<usize> },
    /// PCM samples as in a WAV data chunk: little-endian 16-bit signed or 8-bit unsigned,
    /// channels interleaved.
    Audio { sample_rate: u32, bits: u16, channels: u16 },
}

#[derive(clap::Args, Clone)]
pub struct MediaArgs {
    /// The training bytes are images of this shape (WxHxC, e.g. 28x28x1) in the pixel order of
    /// --order and --block: recorded in RUN/media.json so that `serve`'s playground draws them.
    #[arg(long, value_name = "WxHxC", conflicts_with = "audio")]
    image: Option<String>,
    #[command(flatten)]
    order: PixelOrderArgs,
    /// The training bytes are PCM audio (as `data audio` writes it): RATE:BITS:CHANNELS, e.g.
    /// 8000:16:1. Recorded in RUN/media.json so that `serve`'s playground plays the clips.
    #[arg(long, value_name = "RATE:BITS:CHANNELS")]
    audio: Option<String>,
}

impl MediaArgs {
    /// The media given, checked; None for plain bytes.
    pub fn resolve(&self) -> Result<Option<Media>> {
        if let Some(shape) = &self.image {
            let shape = ImageShape::parse(shape)?;
            let order = self.order.pixel_order();
            order.check(shape)?;
            let (order, block) = match order {
                PixelOrder::Raster => ("raster", None),
                PixelOrder::PatchScan { block } => ("patch_scan", Some(block)),
            };
            let (width, height, channels) = (shape.width, shape.height, shape.channels);
            return Ok(Some(Media::Image { width, height, channels, order: order.into(), block }));
        }
        if let Some(text) = &self.audio {
            let bad = || anyhow::anyhow!("bad --audio `{text}`: use RATE:BITS:CHANNELS, e.g. 8000:16:1");
            let parts: Vec<&str> = text.split(':').collect();
            let [rate, bits, channels] = parts.as_slice() else { return Err(bad()) };
            let format = PcmFormat {
                sample_rate: rate.trim().parse().map_err(|_| bad())?,
                bits: bits.trim().parse().map_err(|_| bad())?,
                channels: channels.trim().parse().map_err(|_| bad())?,
            };
            format.validate()?;
            return Ok(Some(Media::Audio { sample_rate: format.sample_rate, bits: format.bits, channels: format.channels }));
        }
        Ok(None)
    }
}

/// The record of a run folder (or a checkpoint folder), if it has one.
pub fn read(dir: &Path) -> Result<Option<Media>> {
    let path = dir.join(MEDIA_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = megabyte::data::read_regular_file(&path, megabyte::data::JSON_MAX_BYTES, "media record")?;
    let media = serde_json::from_slice(&text).with_context(|| format!("{} is not a media record", path.display()))?;
    Ok(Some(media))
}

/// Records `media` in a new run's folder; a resumed run keeps its record, and a different
/// one given is refused like any setting the run did not start with.
pub fn record(run_dir: &Path, media: Option<&Media>, resuming: bool) -> Result<()> {
    let Some(media) = media else { return Ok(()) };
    if resuming {
        let recorded = read(run_dir)?;
        if recorded.as_ref() != Some(media) {
            bail!(
                "--image/--audio describe {} here and {} in the resumed run, which keeps the settings it started with",
                serde_json::to_string(media)?,
                recorded.map_or("nothing".to_string(), |r| serde_json::to_string(&r).unwrap_or_default())
            );
        }
        return Ok(());
    }
    let path = run_dir.join(MEDIA_FILE);
    let tmp = run_dir.join(format!(".{MEDIA_FILE}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(media)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
