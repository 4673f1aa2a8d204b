//! Property tests of the loaders that read untrusted bytes: checkpoints, model configs, the
//! IDX/PNG/WAV converters and the data folder walk. Each gets arbitrary or mutated input and
//! must return an error or a valid result: never panic, abort or allocate without bound.
//!
//! The case counts keep each property to a few seconds on two CPU cores (`PROPTEST_CASES=N`
//! runs N each); a failing case is kept in `proptest-regressions/` only when it reproduces a
//! real bug.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use megabyte::checkpoint::{self, CheckpointData};
use megabyte::data::{ByteStream, Split};
use megabyte::{DType, Device, ModelConfig};
use megabyte_data::image::{convert_images, PixelOrder};
use proptest::prelude::*;

use crate::{temp_dir, tiny};

/// `cases` cases per property, unless `PROPTEST_CASES` asks for more (a longer local run).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(cases);
    ProptestConfig { cases, max_shrink_iters: 256, ..ProptestConfig::default() }
}

/// One change to a file's bytes: the ways a file gets damaged or forged.
#[derive(Clone, Debug)]
enum Mutation {
    /// Overwrite the byte at this fraction of the length.
    Set(f64, u8),
    /// Overwrite the byte at this index (in the header), if the file is that long.
    SetAt(usize, u8),
    /// Keep only this fraction of the bytes.
    Truncate(f64),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Overwrite 8 bytes at this fraction with a little-endian number (a forged length).
    Number(f64, u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (0.0..1.0f64, any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
        1 => (0.0..1.0f64).prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        2 => (0.0..1.0f64, prop_oneof![any::<u64>(), 0..4096u64, Just(u64::MAX), Just(u32::MAX as u64)])
            .prop_map(|(at, n)| Mutation::Number(at, n)),
    ]
}

/// Mutations aimed at the first `header` bytes, where the headers and lengths are, or anywhere.
fn header_mutation(header: usize) -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => (0..header, prop_oneof![any::<u8>(), Just(0u8), Just(0xffu8)]).prop_map(|(i, b)| Mutation::SetAt(i, b)),
        1 => mutation(),
    ]
}

fn apply(bytes: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let at = |f: f64, len: usize| ((f * len as f64) as usize).min(len.saturating_sub(1));
    for m in mutations {
        match m {
            Mutation::Set(f, b) if !out.is_empty() => {
                let i = at(*f, out.len());
                out[i] = *b;
            }
            Mutation::SetAt(i, b) => {
                if let Some(x) = out.get_mut(*i) {
                    *x = *b;
                }
            }
            Mutation::Set(..) => {}
            Mutation::Truncate(f) => out.truncate((f * out.len() as f64) as usize),
            Mutation::Extend(more) => out.extend_from_slice(more),
            Mutation::Number(f, n) => {
                let i = at(*f, out.len());
                let end = (i + 8).min(out.len());
                out[i..end].copy_from_slice(&n.to_le_bytes()[..end - i]);
            }
        }
    }
    out
}

/// A saved tiny checkpoint, written once: its folder, config.json and model.safetensors.
fn seed_checkpoint() -> &'static (PathBuf, Vec<u8>, Vec<u8>) {
    static SEED: OnceLock<(PathBuf, Vec<u8>, Vec<u8>)> = OnceLock::new();
    SEED.get_or_init(|| {
        let (model, params) = tiny(3);
        let dir = checkpoint::save(&temp_dir("prop-seed-ckpt"), &CheckpointData { step: 1, config: model.config(), params: &params, training: None }).unwrap();
        let config = std::fs::read(dir.join(checkpoint::CONFIG_FILE)).unwrap();
        let weights = std::fs::read(dir.join(checkpoint::MODEL_FILE)).unwrap();
        (dir, config, weights)
    })
}

/// Mutations of model.safetensors: anywhere, or a digit or bracket in its JSON header (after
/// the 8-byte header length), which forges a dtype, a shape or a data offset.
fn weights_mutation() -> impl Strategy<Value = Mutation> {
    let weights = &seed_checkpoint().2;
    let header_end = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let forged = prop_oneof![b'0'..=b'9', Just(b'['), Just(b']'), Just(b','), Just(b'"')];
    prop_oneof![
        2 => (8..header_end, forged).prop_map(|(i, b)| Mutation::SetAt(i, b)),
        1 => header_mutation(8),
    ]
}

/// Names and shapes of a checkpoint's parameters.
fn names_and_shapes(params: &megabyte::nn::Params) -> Vec<(String, Vec<usize>)> {
    params.vars().iter().map(|(k, v)| (k.clone(), v.as_tensor().dims().to_vec())).collect()
}

proptest! {
    #![proptest_config(config(48))]

    /// A damaged checkpoint is refused, or loads a model whose parameters have exactly the
    /// names and shapes its (possibly damaged) config asks for.
    #[test]
    fn damaged_checkpoints_load_or_are_refused(
        config_edits in prop::collection::vec(mutation(), 0..3),
        weight_edits in prop::collection::vec(weights_mutation(), 0..4),
    ) {
        let (seed, config, weights) = seed_checkpoint();
        let dir = temp_dir("prop-ckpt");
        let (config, weights) = (apply(config, &config_edits), apply(weights, &weight_edits));
        std::fs::write(dir.join(checkpoint::CONFIG_FILE), &config).unwrap();
        std::fs::write(dir.join(checkpoint::MODEL_FILE), &weights).unwrap();
        let _ = checkpoint::load_tensors(&dir.join(checkpoint::MODEL_FILE));
        if let Ok(cfg) = checkpoint::load_config(&dir) {
            if let Ok((model, params)) = checkpoint::load_model(&dir, DType::F32, &Device::Cpu) {
                prop_assert_eq!(model.config(), &cfg);
                let (_, expected) = megabyte::MegaByte::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
                prop_assert_eq!(names_and_shapes(&params), names_and_shapes(&expected));
            }
        }
        // The seed itself always loads: the property is not vacuous.
        prop_assert!(checkpoint::load_model(seed, DType::F32, &Device::Cpu).is_ok());
    }
}

/// Arbitrary JSON: numbers of every size and sign, strings, nesting.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e300..1e300f64).prop_map(Value::from),
        (0..8u64).prop_map(Value::from),
        "[a-z_]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A preset's JSON with some fields (nested ones too) replaced by arbitrary values.
fn mutated_preset() -> impl Strategy<Value = serde_json::Value> {
    let presets: Vec<serde_json::Value> =
        megabyte::config::PRESETS.iter().map(|p| serde_json::to_value(ModelConfig::preset(p).unwrap()).unwrap()).collect();
    let number = prop_oneof![
        any::<u64>().prop_map(serde_json::Value::from),
        (0..70u32).prop_map(|e| serde_json::Value::from(1u64 << e)),
        (0..70u32).prop_map(|e| serde_json::Value::from((1u64 << e).wrapping_sub(1))),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("JSON numbers are finite", |v| v.is_finite()).prop_map(serde_json::Value::from),
    ];
    let field_value = prop_oneof![4 => number, 1 => json_value()];
    (prop::sample::select(presets), prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), field_value), 1..4)).prop_map(
        |(mut preset, edits)| {
            for (field, sub, value) in edits {
                let obj = preset.as_object_mut().unwrap();
                let key = field.get(&obj.keys().cloned().collect::<Vec<_>>()).clone();
                match obj.get_mut(&key) {
                    Some(serde_json::Value::Object(inner)) if !inner.is_empty() => {
                        let sub_key = sub.get(&inner.keys().cloned().collect::<Vec<_>>()).clone();
                        inner.insert(sub_key, value);
                    }
                    _ => {
                        obj.insert(key, value);
                    }
                }
            }
            preset
        },
    )
}

fn parse_and_validate(text: &str) {
    if let Ok(cfg) = serde_json::from_str::<ModelConfig>(text) {
        let _ = cfg.validate();
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Any JSON value is parsed and validated as a model config without a panic.
    #[test]
    fn arbitrary_json_is_a_config_or_an_error(value in json_value()) {
        parse_and_validate(&value.to_string());
    }

    /// A preset with fields set to any number (huge widths and layer counts included) is
    /// validated without a panic.
    #[test]
    fn mutated_presets_validate_or_are_refused(value in mutated_preset()) {
        parse_and_validate(&value.to_string());
    }
}

/// An IDX file: magic, dimensions and body.
fn idx_bytes(ndims: u8, dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, ndims];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(body);
    out
}

/// Converts `input` into `out/images.bin` and checks what the folder holds afterwards: the
/// output and its index on success, nothing at all on an error (no temporary file either).
fn convert_and_check_folder(input: &Path, out: &Path, convert: impl FnOnce(&Path) -> bool) -> Result<bool, TestCaseError> {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out).unwrap();
    let ok = convert(&out.join("out.bin"));
    let mut left: Vec<String> = std::fs::read_dir(out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    let expected: Vec<String> = if ok { vec!["out.bin".into(), "out.bin.documents.json".into()] } else { vec![] };
    prop_assert_eq!(left, expected, "after converting {}", input.display());
    Ok(ok)
}

proptest! {
    #![proptest_config(config(256))]

    /// IDX files with small dimensions and any body (truncated, too long, empty): the
    /// conversion writes every announced image or refuses and leaves nothing behind.
    #[test]
    fn idx_files_convert_or_are_refused(
        dims in prop::collection::vec(prop_oneof![1 => Just(0u32), 6 => 1..12u32], 3..=4),
        other_ndims in prop::option::weighted(0.1, any::<u8>()),
        body_change in prop_oneof![2 => Just(0i64), 1 => -3..=3i64, 1 => -2048..2048i64],
        gzip in any::<bool>(),
    ) {
        let dir = temp_dir("prop-idx");
        // A header of another rank is refused before its dimensions are read.
        let ndims = other_ndims.unwrap_or(dims.len() as u8);
        // The announced body (N·H·W·C bytes), often exactly, else cut short or followed by more.
        let announced: i64 = dims.iter().map(|&d| d as i64).product();
        let body_len = (announced + body_change).max(0) as usize;
        let mut bytes = idx_bytes(ndims, &dims, &crate::random_bytes(body_len, body_len as u64));
        if gzip {
            use std::io::Write;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&bytes).unwrap();
            bytes = gz.finish().unwrap();
        }
        let input = dir.join("images.idx");
        std::fs::write(&input, &bytes).unwrap();
        let ok = convert_and_check_folder(&input, &dir.join("out"), |out| convert_images(&input, out, PixelOrder::Raster).is_ok())?;
        // A file that converts holds exactly the images its header announces.
        if ok {
            prop_assert_eq!(ndims as usize, dims.len());
            prop_assert_eq!(body_len as i64, announced);
            // In raster order the output is the body itself.
            prop_assert_eq!(std::fs::read(dir.join("out/out.bin")).unwrap(), crate::random_bytes(body_len, body_len as u64));
        }
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// IDX headers with any dimensions (up to 2³²−1 each) over a short body: refused or read,
    /// never an abort. Before image.rs bounded the sizes it takes from a header, `00 00 08 03`
    /// with N = 1 and H = W = 2³²−1 allocated W·H bytes for the first image and aborted the
    /// process, as did a rank-4 header whose fourth dimension is read from the pixels.
    #[test]
    fn idx_headers_of_any_size_are_refused_or_read(
        dims in prop::collection::vec(prop_oneof![any::<u32>(), Just(65536u32), Just(u32::MAX)], 3..=4),
        body_len in 0..256usize,
    ) {
        let dir = temp_dir("prop-idx-huge");
        let input = dir.join("images.idx");
        std::fs::write(&input, idx_bytes(dims.len() as u8, &dims, &vec![7u8; body_len])).unwrap();
        convert_and_check_folder(&input, &dir.join("out"), |out| convert_images(&input, out, PixelOrder::Raster).is_ok())?;
    }
}

/// A valid small PNG of `width`×`height` with `channels` channels.
fn png_bytes(width: u32, height: u32, channels: u8, seed: u64) -> Vec<u8> {
    let color = match channels {
        1 => image::ColorType::L8,
        2 => image::ColorType::La8,
        3 => image::ColorType::Rgb8,
        _ => image::ColorType::Rgba8,
    };
    let raster = crate::random_bytes((width * height) as usize * channels as usize, seed);
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out).write_image(&raster, width, height, color).unwrap();
    out
}

use image::ImageEncoder;

proptest! {
    #![proptest_config(config(128))]

    /// Damaged PNG files (bytes changed in the header and chunks, truncated, extended):
    /// decoded to an image of the announced shape, or refused with nothing left behind.
    #[test]
    fn damaged_pngs_convert_or_are_refused(
        width in 1..9u32, height in 1..9u32, channels in 1..=4u8, seed in any::<u64>(),
        edits in prop::collection::vec(header_mutation(48), 1..4),
    ) {
        let dir = temp_dir("prop-png");
        let input = dir.join("image.png");
        std::fs::write(&input, apply(&png_bytes(width, height, channels, seed), &edits)).unwrap();
        let decoded = megabyte_data::image::decode(&input);
        if let Ok((shape, bytes)) = &decoded {
            prop_assert_eq!(bytes.len(), shape.width * shape.height * shape.channels);
        }
        convert_and_check_folder(&input, &dir.join("out"), |out| convert_images(&input, out, PixelOrder::Raster).is_ok())?;
    }
}

/// A valid small WAV written by hound: 8- or 16-bit, mono or stereo.
fn wav_bytes(bits: u16, channels: u16, frames: usize, seed: u64) -> Vec<u8> {
    let spec = hound::WavSpec { channels, sample_rate: 8000, bits_per_sample: bits, sample_format: hound::SampleFormat::Int };
    let mut cursor = std::io::Cursor::new(Vec::new());
    let mut w = hound::WavWriter::new(&mut cursor, spec).unwrap();
    for (i, b) in crate::random_bytes(frames * channels as usize, seed).into_iter().enumerate() {
        if bits == 8 {
            w.write_sample(b as i8).unwrap();
        } else {
            w.write_sample((b as i16) << 8 | i as i16 & 0xff).unwrap();
        }
    }
    w.finalize().unwrap();
    cursor.into_inner()
}

proptest! {
    #![proptest_config(config(128))]

    /// Damaged WAV files (header fields and chunk lengths forged, truncated, extended):
    /// whole frames of a supported format, or refused with nothing left behind.
    #[test]
    fn damaged_wavs_convert_or_are_refused(
        bits in prop_oneof![Just(8u16), Just(16u16)], channels in 1..=2u16, frames in 0..64usize, seed in any::<u64>(),
        edits in prop::collection::vec(header_mutation(44), 1..4),
    ) {
        let dir = temp_dir("prop-wav");
        let input = dir.join("clip.wav");
        std::fs::write(&input, apply(&wav_bytes(bits, channels, frames, seed), &edits)).unwrap();
        if let Ok((format, bytes)) = megabyte_data::audio::read_wav(&input) {
            prop_assert!(format.validate().is_ok());
            prop_assert_eq!(bytes.len() % format.frame_bytes(), 0);
        }
        convert_and_check_folder(&input, &dir.join("out"), |out| megabyte_data::audio::convert_audio(&input, out).is_ok())?;
    }
}

/// A folder tree: files (possibly empty) and nested folders.
#[derive(Clone, Debug)]
enum Node {
    File(Vec<u8>),
    Dir(BTreeMap<String, Node>),
}

fn tree() -> impl Strategy<Value = BTreeMap<String, Node>> {
    let file = prop_oneof![1 => Just(Vec::new()), 3 => prop::collection::vec(any::<u8>(), 1..48)].prop_map(Node::File);
    let node = file.prop_recursive(3, 24, 4, |inner| prop::collection::btree_map("[a-c]{1,2}(\\.txt)?", inner, 0..4).prop_map(Node::Dir));
    prop::collection::btree_map("[a-c]{1,2}(\\.txt)?", node, 0..5)
}

/// Writes the tree under `dir`; returns its files and their bytes.
fn write_tree(dir: &Path, nodes: &BTreeMap<String, Node>, files: &mut Vec<(PathBuf, Vec<u8>)>) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, node) in nodes {
        let path = dir.join(name);
        match node {
            Node::File(bytes) => {
                std::fs::write(&path, bytes).unwrap();
                files.push((path, bytes.clone()));
            }
            Node::Dir(inner) => write_tree(&path, inner, files),
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// A data folder reads as the concatenation of its files in path order (empty files
    /// and empty folders add nothing); a folder without bytes is refused.
    #[test]
    fn a_data_folder_is_its_files_in_path_order(nodes in tree()) {
        let root = temp_dir("prop-walk").join("data");
        let mut files = Vec::new();
        write_tree(&root, &nodes, &mut files);
        files.sort();
        let expected: Vec<u8> = files.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        match ByteStream::open(&root) {
            Ok(stream) => {
                let stream = std::sync::Arc::new(stream);
                prop_assert_eq!(stream.len(), expected.len() as u64);
                prop_assert_eq!(Split::all(stream.clone()).window(0, expected.len()).unwrap(), expected);
                let kept: Vec<&PathBuf> = files.iter().filter(|(_, b)| !b.is_empty()).map(|(p, _)| p).collect();
                prop_assert_eq!(stream.files().iter().map(|(p, _)| p).collect::<Vec<_>>(), kept);
            }
            Err(e) => prop_assert!(expected.is_empty(), "refused a folder of {} bytes: {e}", expected.len()),
        }
    }
}
