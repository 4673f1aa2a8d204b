//! Images as bytes: pixel orders, IDX and PNG input, PNG grids out, and the CLI round trip.

use std::path::Path;
use std::process::Command;

use megabyte_data::image::{convert_images, read_grid_png, write_grid_png, IdxImages, ImageShape, ImageSource, PixelOrder};

use crate::{random_bytes, temp_dir};

fn megabyte(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_megabyte")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An IDX file of u8 images N×H×W (grey) or N×H×W×C.
fn idx_bytes(n: usize, shape: ImageShape, pixels: &[u8]) -> Vec<u8> {
    let four = shape.channels != 1;
    let mut out = vec![0, 0, 0x08, if four { 4 } else { 3 }];
    let mut dims = vec![n as u32, shape.height as u32, shape.width as u32];
    if four {
        dims.push(shape.channels as u32);
    }
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(pixels);
    out
}

#[test]
fn patch_scan_round_trips_and_keeps_blocks_together() {
    for (w, h, c, p) in [(8, 8, 1, 2), (12, 8, 3, 4), (28, 28, 1, 4), (28, 28, 1, 7), (6, 9, 2, 3), (5, 5, 4, 1)] {
        let shape = ImageShape { width: w, height: h, channels: c };
        let raster = random_bytes(shape.bytes(), (w * 100 + p) as u64);
        let order = PixelOrder::PatchScan { block: p };
        let scanned = order.from_raster(&raster, shape).unwrap();
        assert_eq!(order.to_raster(&scanned, shape).unwrap(), raster, "{shape} block {p}");
        if p > 1 && p < w {
            assert_ne!(scanned, raster, "{shape} block {p}: patch-scan reorders");
        }
        // Each run of p·p·C bytes is one block: block k's bytes are the raster bytes of its pixels.
        let per_block = p * p * c;
        let blocks_per_row = w / p;
        for (k, chunk) in scanned.chunks(per_block).enumerate() {
            let (by, bx) = (k / blocks_per_row, k % blocks_per_row);
            let expected: Vec<u8> = (by * p..(by + 1) * p)
                .flat_map(|y| (bx * p..(bx + 1) * p).map(move |x| (y, x)))
                .flat_map(|(y, x)| raster[(y * w + x) * c..(y * w + x + 1) * c].to_vec())
                .collect();
            assert_eq!(chunk, &expected[..], "{shape} block {p}, block {k}");
        }
    }
    let shape = ImageShape { width: 10, height: 8, channels: 1 };
    let raster = random_bytes(80, 1);
    assert_eq!(PixelOrder::Raster.from_raster(&raster, shape).unwrap(), raster);
    let err = PixelOrder::PatchScan { block: 4 }.from_raster(&raster, shape).unwrap_err().to_string();
    assert!(err.contains("multiples of 4"), "{err}");
}

#[test]
fn idx_files_parse_and_bad_ones_are_refused() {
    let dir = temp_dir("idx");
    let shape = ImageShape { width: 4, height: 3, channels: 1 };
    let pixels = random_bytes(5 * shape.bytes(), 3);
    let path = dir.join("images-idx3-ubyte");
    std::fs::write(&path, idx_bytes(5, shape, &pixels)).unwrap();
    let mut idx = IdxImages::open(&path).unwrap();
    assert_eq!((idx.shape(), idx.count()), (shape, 5));
    let mut got = Vec::new();
    while let Some(img) = idx.next_image().unwrap() {
        got.extend(img);
    }
    assert_eq!(got, pixels);

    // Gzipped, as MNIST is distributed; and an RGB IDX (4 dimensions).
    let gz = dir.join("images.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, &idx_bytes(5, shape, &pixels)).unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    let out = dir.join("gz.bin");
    let r = convert_images(&gz, &out, PixelOrder::Raster).unwrap();
    assert_eq!((r.images, r.bytes), (5, pixels.len() as u64));
    assert_eq!(std::fs::read(&out).unwrap(), pixels);
    let rgb = ImageShape { width: 2, height: 2, channels: 3 };
    std::fs::write(dir.join("rgb.idx"), idx_bytes(2, rgb, &random_bytes(24, 4))).unwrap();
    assert_eq!(IdxImages::open(&dir.join("rgb.idx")).unwrap().shape(), rgb);

    let refused = |bytes: Vec<u8>, needle: &str| {
        let p = dir.join("bad.idx");
        std::fs::write(&p, bytes).unwrap();
        let out = dir.join("bad.bin");
        let err = convert_images(&p, &out, PixelOrder::Raster).unwrap_err().to_string();
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        assert!(!out.exists(), "a refused conversion leaves no output");
        assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp-")));
    };
    let good = idx_bytes(5, shape, &pixels);
    refused([&[1u8, 0, 8, 3][..], &good[4..]].concat(), "wrong magic");
    refused([&[0u8, 0, 0x0d, 3][..], &good[4..]].concat(), "not 0x08");
    refused([&[0u8, 0, 8, 1][..], &good[4..]].concat(), "3 dimensions");
    refused(good[..good.len() - 1].to_vec(), "truncated");
    refused(good[..10].to_vec(), "truncated header");
    refused([&good[..], &[7u8]].concat(), "bytes after");
}

#[test]
fn png_folders_convert_and_mismatched_sizes_are_refused() {
    let dir = temp_dir("png");
    let input = dir.join("pngs");
    std::fs::create_dir_all(&input).unwrap();
    let shape = ImageShape { width: 8, height: 4, channels: 3 };
    let rasters: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(shape.bytes(), 10 + i)).collect();
    for (i, r) in rasters.iter().enumerate() {
        image::save_buffer(input.join(format!("{i}.png")), r, 8, 4, image::ColorType::Rgb8).unwrap();
    }
    std::fs::write(input.join("notes.txt"), b"not an image").unwrap();
    let out = dir.join("images.bin");
    let r = convert_images(&input, &out, PixelOrder::PatchScan { block: 4 }).unwrap();
    assert_eq!((r.images, r.shape), (3, shape));
    let order = PixelOrder::PatchScan { block: 4 };
    let expected: Vec<u8> = rasters.iter().flat_map(|r| order.from_raster(r, shape).unwrap()).collect();
    assert_eq!(std::fs::read(&out).unwrap(), expected);
    let index: megabyte::documents::DocumentIndex =
        serde_json::from_slice(&std::fs::read(dir.join("images.bin.documents.json")).unwrap()).unwrap();
    assert_eq!(index.record_bytes, Some(shape.bytes() as u64));
    assert_eq!(index.about["order"], "patch-scan");

    // An existing output is never overwritten.
    let err = convert_images(&input, &out, order).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), expected);

    // One image of another size: a clear error naming it, and no output.
    image::save_buffer(input.join("9.png"), &random_bytes(4 * 4 * 3, 5), 4, 4, image::ColorType::Rgb8).unwrap();
    let err = convert_images(&input, &dir.join("mixed.bin"), order).unwrap_err().to_string();
    assert!(err.contains("9.png") && err.contains("one shape"), "{err}");
    assert!(!dir.join("mixed.bin").exists());
    // Sizes not divisible by the block, and an empty folder.
    std::fs::remove_file(input.join("9.png")).unwrap();
    let err = convert_images(&input, &dir.join("b3.bin"), PixelOrder::PatchScan { block: 3 }).unwrap_err().to_string();
    assert!(err.contains("multiples of 3"), "{err}");
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let err = convert_images(&dir.join("empty"), &dir.join("e.bin"), order).unwrap_err().to_string();
    assert!(err.contains("no .png"), "{err}");
}

#[test]
fn a_grid_png_reads_back_as_its_pixels() {
    let dir = temp_dir("grid");
    for (shape, count, columns) in [
        (ImageShape { width: 5, height: 3, channels: 1 }, 11, 4),
        (ImageShape { width: 4, height: 4, channels: 3 }, 3, 8),
        (ImageShape { width: 2, height: 6, channels: 4 }, 7, 7),
    ] {
        let images: Vec<Vec<u8>> = (0..count).map(|i| random_bytes(shape.bytes(), 50 + i as u64)).collect();
        let path = dir.join(format!("grid-{shape}.png"));
        write_grid_png(&images, shape, columns, &path).unwrap();
        assert_eq!(read_grid_png(&path, shape, count, columns).unwrap(), images, "{shape}");
    }
}

#[test]
fn the_cli_converts_idx_and_generates_an_image_grid() {
    let dir = temp_dir("images-cli");
    let shape = ImageShape { width: 8, height: 8, channels: 1 };
    let pixels = random_bytes(40 * shape.bytes(), 7);
    std::fs::write(dir.join("train.idx"), idx_bytes(40, shape, &pixels)).unwrap();
    let data = dir.join("train.bin");
    let (ok, stdout, stderr) =
        megabyte(&["data", "images", s(&dir.join("train.idx")), s(&data), "--order", "patch-scan", "--block", "4"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("40 images of 8x8x1"), "{stdout}");
    let (ok, _, stderr) = megabyte(&["data", "images", s(&dir.join("train.idx")), s(&dir.join("b.bin")), "--block", "3"]);
    assert!(!ok && stderr.contains("multiples of 3"), "{stderr}");

    // A tiny model, trained one step with images as documents, then 5 images sampled.
    let run = dir.join("run");
    let (ok, _, stderr) = megabyte(&[
        "train", "--data", s(&data), "--out", s(&run), "--steps", "1", "--documents", "--valid-bytes", "640",
        "--sample-bytes", "0", "--batch-size", "2", "--eval-bytes", "640",
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("isolated documents"), "{stderr}");
    let grid = dir.join("grid.png");
    let (ok, stdout, stderr) =
        megabyte(&["generate", "--checkpoint", s(&run), "--image", "8x8x1", "--count", "5", "--columns", "2", "--out", s(&grid)]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("5 images"), "{stdout}");
    let (grid_shape, _) = megabyte_data::image::decode(&grid).unwrap();
    // 2 columns, 3 rows of 8×8 with 2-pixel gaps.
    assert_eq!((grid_shape.width, grid_shape.height, grid_shape.channels), (2 + 2 * 10, 2 + 3 * 10, 1));
    let (ok, _, stderr) = megabyte(&[
        "generate", "--checkpoint", s(&run), "--image", "8x8x1", "--prompt", "abc", "--out", s(&dir.join("g2.png")),
    ]);
    assert!(!ok && stderr.contains("whole number"), "{stderr}");
}
