//! Images as bytes (paper §5.2, §6): each image's W×H×C pixel bytes, in raster order or in
//! the paper's *patch-scan* order, where the image is cut into p×p pixel blocks taken in
//! raster order (block rows top to bottom, blocks left to right), and each block's pixels
//! are also taken in raster order, every pixel with its C channel bytes. With P = p·p·C one
//! model patch is exactly one pixel block.
//!
//! In: IDX files (the MNIST / Fashion-MNIST format, gzipped or not) and PNG/JPEG files (a file
//! or a folder of them). Out: one byte file of the images concatenated, with a sidecar
//! document index of fixed records (W·H·C bytes each), and PNG grids of generated images.

use std::io::Read;
use std::path::{Path, PathBuf};

use megabyte::documents::DocumentIndex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::files::{has_extension, list_files, OutputFile};

/// The largest image, in bytes, that a shape may describe (8192×8192 RGBA): a bound on what
/// one image allocates, whatever a file header or a flag says.
pub const MAX_IMAGE_BYTES: usize = 1 << 28;

/// Width, height and channels (1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) of 8-bit images.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageShape {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
}

impl ImageShape {
    /// `WxHxC` (e.g. `28x28x1`, `32x32x3`), or `WxH` for one channel.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || Error::Input(format!("bad image shape `{text}`: use WxHxC, e.g. 28x28x1 or 32x32x3"));
        let parts: Vec<usize> =
            text.split('x').map(|n| n.trim().parse::<usize>()).collect::<std::result::Result<_, _>>().map_err(|_| bad())?;
        let shape = match parts[..] {
            [width, height] => ImageShape { width, height, channels: 1 },
            [width, height, channels] => ImageShape { width, height, channels },
            _ => return Err(bad()),
        };
        shape.validate()?;
        Ok(shape)
    }

    pub fn validate(&self) -> Result<()> {
        if self.width == 0 || self.height == 0 || !(1..=4).contains(&self.channels) {
            return Err(Error::Input(format!(
                "image shape {self}: width and height must be positive and channels 1 to 4"
            )));
        }
        let bytes = self.width.checked_mul(self.height).and_then(|n| n.checked_mul(self.channels));
        if bytes.is_none_or(|n| n > MAX_IMAGE_BYTES) {
            return Err(Error::Input(format!(
                "image shape {self}: an image may hold at most {MAX_IMAGE_BYTES} bytes (8192x8192x4); this one {}",
                bytes.map_or_else(|| "overflows a 64-bit count".to_string(), |n| format!("holds {n}"))
            )));
        }
        Ok(())
    }

    /// Bytes per image: W·H·C (at most [`MAX_IMAGE_BYTES`] once validated).
    pub fn bytes(&self) -> usize {
        self.width.saturating_mul(self.height).saturating_mul(self.channels)
    }
}

impl std::fmt::Display for ImageShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.width, self.height, self.channels)
    }
}

/// The order in which an image's pixels become bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "order")]
pub enum PixelOrder {
    /// Rows top to bottom, pixels left to right, channels of each pixel together.
    Raster,
    /// p×p pixel blocks in raster order, raster order inside each block (the paper's).
    PatchScan { block: usize },
}

impl PixelOrder {
    /// `raster`, or `patch-scan` with its block size p.
    pub fn parse(order: &str, block: usize) -> Result<Self> {
        match order {
            "raster" => Ok(PixelOrder::Raster),
            "patch-scan" => Ok(PixelOrder::PatchScan { block }),
            other => Err(Error::Input(format!("unknown pixel order `{other}`: use patch-scan or raster"))),
        }
    }

    /// Errors unless this order applies to images of `shape`.
    pub fn check(&self, shape: ImageShape) -> Result<()> {
        shape.validate()?;
        if let PixelOrder::PatchScan { block } = *self {
            if block == 0 || shape.width % block != 0 || shape.height % block != 0 {
                return Err(Error::Input(format!(
                    "patch-scan with {block}×{block} blocks needs width and height that are multiples of {block}; \
                     the images are {}×{} (choose a block that divides both, or --order raster)",
                    shape.width, shape.height
                )));
            }
        }
        Ok(())
    }

    /// For each byte of the ordered image, the index of the raster byte it holds.
    fn permutation(&self, shape: ImageShape) -> Result<Vec<usize>> {
        self.check(shape)?;
        let (w, h, c) = (shape.width, shape.height, shape.channels);
        Ok(match *self {
            PixelOrder::Raster => (0..shape.bytes()).collect(),
            PixelOrder::PatchScan { block: p } => {
                let mut perm = Vec::with_capacity(shape.bytes());
                for by in 0..h / p {
                    for bx in 0..w / p {
                        for y in by * p..(by + 1) * p {
                            for x in bx * p..(bx + 1) * p {
                                let pixel = (y * w + x) * c;
                                perm.extend(pixel..pixel + c);
                            }
                        }
                    }
                }
                perm
            }
        })
    }

    /// One raster image (H·W·C bytes) in this order.
    pub fn from_raster(&self, raster: &[u8], shape: ImageShape) -> Result<Vec<u8>> {
        check_len(raster, shape)?;
        Ok(self.permutation(shape)?.iter().map(|&i| raster[i]).collect())
    }

    /// One image in this order back to raster order.
    pub fn to_raster(&self, ordered: &[u8], shape: ImageShape) -> Result<Vec<u8>> {
        check_len(ordered, shape)?;
        let mut raster = vec![0u8; ordered.len()];
        for (&b, &i) in ordered.iter().zip(&self.permutation(shape)?) {
            raster[i] = b;
        }
        Ok(raster)
    }

    fn describe(&self) -> serde_json::Value {
        match *self {
            PixelOrder::Raster => serde_json::json!({"order": "raster"}),
            PixelOrder::PatchScan { block } => serde_json::json!({"order": "patch-scan", "block": block}),
        }
    }
}

fn check_len(bytes: &[u8], shape: ImageShape) -> Result<()> {
    if bytes.len() != shape.bytes() {
        return Err(Error::Input(format!("an image of shape {shape} has {} bytes, got {}", shape.bytes(), bytes.len())));
    }
    Ok(())
}

/// Images read one at a time in raster order, all of one shape.
pub trait ImageSource {
    fn shape(&self) -> ImageShape;
    /// The next image's raster bytes, or `None` at the end.
    fn next_image(&mut self) -> Result<Option<Vec<u8>>>;
    /// Where the images come from (for the index).
    fn describe(&self) -> serde_json::Value;
}

/// An IDX file of u8 images: magic 0x00 0x00 0x08 n (n = 3: N×H×W grey, n = 4: N×H×W×C),
/// big-endian u32 dimensions, then the pixels. Gzipped files (`.gz` as distributed) are
/// read through gzip.
pub struct IdxImages {
    path: PathBuf,
    reader: Box<dyn Read>,
    shape: ImageShape,
    count: u64,
    read: u64,
}

impl IdxImages {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Data { path: path.into(), msg };
        let file = std::fs::File::open(path).io_context(|| format!("opening {}", path.display()))?;
        let mut file = std::io::BufReader::new(file);
        let mut head = [0u8; 2];
        let gz = {
            use std::io::BufRead;
            let buf = file.fill_buf().io_context(|| format!("reading {}", path.display()))?;
            head.iter_mut().zip(buf).for_each(|(h, &b)| *h = b);
            buf.len() >= 2 && head == [0x1f, 0x8b]
        };
        let mut reader: Box<dyn Read> =
            if gz { Box::new(std::io::BufReader::new(flate2::read::GzDecoder::new(file))) } else { Box::new(file) };
        let mut magic = [0u8; 4];
        read_exact(&mut reader, &mut magic)
            .map_err(|e| bad(format!("cannot read the IDX magic ({e}); is this an IDX file?")))?;
        if magic[0] != 0 || magic[1] != 0 {
            return Err(bad(format!("wrong magic {magic:02x?}: an IDX file starts with 00 00")));
        }
        if magic[2] != 0x08 {
            return Err(bad(format!(
                "IDX element type 0x{:02x} is not 0x08 (unsigned bytes); only u8 images are supported",
                magic[2]
            )));
        }
        let ndims = magic[3] as usize;
        if !(3..=4).contains(&ndims) {
            return Err(bad(format!(
                "an IDX file of images has 3 dimensions (N×H×W) or 4 (N×H×W×C), this one {ndims} (a label file?)"
            )));
        }
        let mut dims = vec![0usize; ndims];
        for d in dims.iter_mut() {
            let mut b = [0u8; 4];
            read_exact(&mut reader, &mut b).map_err(|e| bad(format!("truncated header ({e})")))?;
            *d = u32::from_be_bytes(b) as usize;
        }
        let shape = ImageShape { width: dims[2], height: dims[1], channels: dims.get(3).copied().unwrap_or(1) };
        shape.validate().map_err(|e| bad(e.to_string()))?;
        Ok(IdxImages { path: path.into(), reader, shape, count: dims[0] as u64, read: 0 })
    }

    /// Images the header announces.
    pub fn count(&self) -> u64 {
        self.count
    }
}

fn read_exact(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<()> {
    r.read_exact(buf)
}

impl ImageSource for IdxImages {
    fn shape(&self) -> ImageShape {
        self.shape
    }

    fn next_image(&mut self) -> Result<Option<Vec<u8>>> {
        let bad = |msg: String| Error::Data { path: self.path.clone(), msg };
        if self.read == self.count {
            let mut extra = [0u8; 1];
            return match self.reader.read(&mut extra) {
                Ok(0) => Ok(None),
                Ok(_) => Err(bad(format!("has bytes after the {} images its header announces", self.count))),
                Err(e) => Err(bad(format!("cannot read ({e})"))),
            };
        }
        let mut image = vec![0u8; self.shape.bytes()];
        read_exact(&mut self.reader, &mut image).map_err(|e| {
            bad(format!("truncated: image {} of the {} its header announces is incomplete ({e})", self.read, self.count))
        })?;
        self.read += 1;
        Ok(Some(image))
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"format": "idx", "source": self.path})
    }
}

/// PNG and JPEG files (one file, or every `.png`, `.jpg`, `.jpeg` under a folder, sorted by
/// path), decoded to 8-bit grey, grey + alpha, RGB or RGBA as stored; all must share one shape.
pub struct ImageFiles {
    files: Vec<PathBuf>,
    next: usize,
    shape: ImageShape,
    first: Option<Vec<u8>>,
}

pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

impl ImageFiles {
    pub fn open(path: &Path) -> Result<Self> {
        let files = if path.is_dir() {
            let files = list_files(path, &|p| has_extension(p, IMAGE_EXTENSIONS))?;
            if files.is_empty() {
                return Err(Error::Data { path: path.into(), msg: "the folder holds no .png, .jpg or .jpeg files".into() });
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        let (shape, first) = decode(&files[0])?;
        Ok(ImageFiles { files, next: 1, shape, first: Some(first) })
    }

    pub fn count(&self) -> usize {
        self.files.len()
    }
}

/// One PNG/JPEG file as (shape, raster bytes).
pub fn decode(path: &Path) -> Result<(ImageShape, Vec<u8>)> {
    use ::image::DynamicImage as D;
    let bad = |msg: String| Error::Data { path: path.into(), msg };
    let img = ::image::io::Reader::open(path)
        .io_context(|| format!("opening {}", path.display()))?
        .with_guessed_format()
        .io_context(|| format!("reading {}", path.display()))?
        .decode()
        .map_err(|e| bad(format!("cannot decode it as PNG or JPEG ({e})")))?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let (channels, bytes) = match img {
        D::ImageLuma8(i) => (1, i.into_raw()),
        D::ImageLumaA8(i) => (2, i.into_raw()),
        D::ImageRgb8(i) => (3, i.into_raw()),
        D::ImageRgba8(i) => (4, i.into_raw()),
        other => {
            return Err(bad(format!(
                "pixel format {:?} is not supported: only 8-bit grey, grey+alpha, RGB and RGBA",
                other.color()
            )))
        }
    };
    Ok((ImageShape { width, height, channels }, bytes))
}

impl ImageSource for ImageFiles {
    fn shape(&self) -> ImageShape {
        self.shape
    }

    fn next_image(&mut self) -> Result<Option<Vec<u8>>> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        let Some(path) = self.files.get(self.next) else { return Ok(None) };
        self.next += 1;
        let (shape, bytes) = decode(path)?;
        if shape != self.shape {
            return Err(Error::Data {
                path: path.clone(),
                msg: format!(
                    "is {shape} but {} is {}: all images of one output must have one shape (W×H×C)",
                    self.files[0].display(),
                    self.shape
                ),
            });
        }
        Ok(Some(bytes))
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"format": "png/jpeg", "files": self.files.len(), "first": self.files[0]})
    }
}

/// Opens IDX (by its content: the 00 00 magic, or gzip) or PNG/JPEG input.
pub fn open_images(path: &Path) -> Result<Box<dyn ImageSource>> {
    if path.is_file() && !has_extension(path, IMAGE_EXTENSIONS) {
        return Ok(Box::new(IdxImages::open(path)?));
    }
    Ok(Box::new(ImageFiles::open(path)?))
}

/// What a conversion wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ImagesReport {
    pub output: PathBuf,
    pub index: PathBuf,
    pub images: u64,
    pub shape: ImageShape,
    pub bytes: u64,
}

/// Converts `input` (IDX, or PNG/JPEG file or folder) to `output`: every image's bytes in
/// `order`, concatenated, and the sidecar index (records of W·H·C bytes). Nothing is left
/// at `output` on an error, and an existing output is refused.
pub fn convert_images(input: &Path, output: &Path, order: PixelOrder) -> Result<ImagesReport> {
    let mut source = open_images(input)?;
    let shape = source.shape();
    order.check(shape).map_err(|e| Error::Data { path: input.into(), msg: e.to_string() })?;
    let mut out = OutputFile::create(output)?;
    let mut images = 0u64;
    while let Some(raster) = source.next_image()? {
        out.write(&order.from_raster(&raster, shape)?)?;
        images += 1;
    }
    let bytes = out.written();
    let mut about = serde_json::json!({
        "kind": "images",
        "width": shape.width,
        "height": shape.height,
        "channels": shape.channels,
        "images": images,
        "input": source.describe(),
    });
    merge(&mut about, order.describe());
    let index = DocumentIndex::records(bytes, shape.bytes() as u64, about);
    let output = out.finish(&index)?;
    Ok(ImagesReport { index: DocumentIndex::sidecar(&output), output, images, shape, bytes })
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// Pixels between grid cells and around the grid.
pub const GRID_GAP: usize = 2;
/// The value of the gap pixels (every channel): mid grey, visible on black and white.
pub const GRID_GAP_VALUE: u8 = 128;
/// The largest side of a grid PNG, in pixels (PNG allows 2³¹ − 1).
pub const MAX_GRID_SIDE: usize = (1 << 31) - 1;
/// The largest grid, in bytes.
pub const MAX_GRID_BYTES: usize = 1 << 32;

/// Top-left pixel (x, y) of image `i` in a grid of `columns` columns.
pub fn grid_cell(i: usize, columns: usize, shape: ImageShape) -> (usize, usize) {
    let (col, row) = (i % columns, i / columns);
    (GRID_GAP + col * (shape.width + GRID_GAP), GRID_GAP + row * (shape.height + GRID_GAP))
}

/// The width and height in pixels of the grid PNG of `count` images of `shape` in `columns`
/// columns, or an error when it would be empty or larger than [`MAX_GRID_SIDE`] a side or
/// [`MAX_GRID_BYTES`] in all: callers check it before generating the images.
pub fn grid_size(count: usize, shape: ImageShape, columns: usize) -> Result<(usize, usize)> {
    shape.validate()?;
    if count == 0 || columns == 0 {
        return Err(Error::Input("a grid needs at least one image and one column".into()));
    }
    let columns = columns.min(count);
    let rows = count.div_ceil(columns);
    let side = |n: usize, len: usize| n.checked_mul(len + GRID_GAP).and_then(|x| x.checked_add(GRID_GAP));
    match (side(columns, shape.width), side(rows, shape.height)) {
        (Some(gw), Some(gh)) if gw <= MAX_GRID_SIDE && gh <= MAX_GRID_SIDE && gw.saturating_mul(gh).saturating_mul(shape.channels) <= MAX_GRID_BYTES => {
            Ok((gw, gh))
        }
        _ => Err(Error::Input(format!(
            "a grid of {count} images of {shape} in {columns} columns is too large for one PNG (at most \
             {MAX_GRID_SIDE} pixels a side and {MAX_GRID_BYTES} bytes); generate fewer or smaller images"
        ))),
    }
}

/// Writes raster images (each `shape.bytes()`) as one PNG: `columns` per row, a gap of
/// [`GRID_GAP`] pixels of [`GRID_GAP_VALUE`] between and around them.
pub fn write_grid_png(images: &[Vec<u8>], shape: ImageShape, columns: usize, path: &Path) -> Result<()> {
    let (gw, gh) = grid_size(images.len(), shape, columns)?;
    let columns = columns.min(images.len());
    let c = shape.channels;
    let mut grid = vec![GRID_GAP_VALUE; gw * gh * c];
    for (i, img) in images.iter().enumerate() {
        check_len(img, shape)?;
        let (x0, y0) = grid_cell(i, columns, shape);
        for y in 0..shape.height {
            let src = &img[y * shape.width * c..(y + 1) * shape.width * c];
            let at = ((y0 + y) * gw + x0) * c;
            grid[at..at + shape.width * c].copy_from_slice(src);
        }
    }
    let color = match c {
        1 => ::image::ColorType::L8,
        2 => ::image::ColorType::La8,
        3 => ::image::ColorType::Rgb8,
        _ => ::image::ColorType::Rgba8,
    };
    let tmp = crate::files::temp_path(path);
    let result = ::image::save_buffer_with_format(&tmp, &grid, gw as u32, gh as u32, color, ::image::ImageFormat::Png);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Input(format!("writing {}: {e}", path.display())));
    }
    std::fs::rename(&tmp, path).io_context(|| format!("renaming {} into place", tmp.display())).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Reads a PNG written by [`write_grid_png`] back into its cells (raster bytes each).
pub fn read_grid_png(path: &Path, shape: ImageShape, count: usize, columns: usize) -> Result<Vec<Vec<u8>>> {
    let (grid_shape, grid) = decode(path)?;
    if grid_shape.channels != shape.channels {
        return Err(Error::Data { path: path.into(), msg: format!("has {} channels, not {}", grid_shape.channels, shape.channels) });
    }
    let columns = columns.min(count);
    let (c, gw) = (shape.channels, grid_shape.width);
    (0..count)
        .map(|i| {
            let (x0, y0) = grid_cell(i, columns, shape);
            if x0 + shape.width > gw || y0 + shape.height > grid_shape.height {
                return Err(Error::Data { path: path.into(), msg: format!("too small for {count} images of {shape}") });
            }
            Ok((0..shape.height)
                .flat_map(|y| grid[((y0 + y) * gw + x0) * c..((y0 + y) * gw + x0 + shape.width) * c].iter().copied())
                .collect())
        })
        .collect()
}
