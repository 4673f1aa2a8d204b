//! Audio as bytes: WAV clips to sample bytes and back, and generated clips.

use std::path::Path;
use std::process::Command;

use megabyte_data::audio::{clip_bytes, convert_audio, read_wav, write_wav, PcmFormat};

use crate::temp_dir;

fn megabyte(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_megabyte")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn spec(rate: u32, bits: u16, channels: u16) -> hound::WavSpec {
    hound::WavSpec { channels, sample_rate: rate, bits_per_sample: bits, sample_format: hound::SampleFormat::Int }
}

/// A 16-bit clip of `n` samples (all channels) with a deterministic waveform.
fn write_i16(path: &Path, rate: u32, channels: u16, n: usize, seed: i32) -> Vec<i16> {
    let samples: Vec<i16> = (0..n as i32).map(|i| ((i * 7919 + seed * 104729) % 65536 - 32768) as i16).collect();
    let mut w = hound::WavWriter::create(path, spec(rate, 16, channels)).unwrap();
    for &x in &samples {
        w.write_sample(x).unwrap();
    }
    w.finalize().unwrap();
    samples
}

#[test]
fn wav_clips_convert_to_their_sample_bytes() {
    let dir = temp_dir("wav");
    let clips = dir.join("clips");
    std::fs::create_dir_all(clips.join("more")).unwrap();
    let a = write_i16(&clips.join("a.wav"), 8000, 2, 1000, 1);
    let b = write_i16(&clips.join("more/b.wav"), 8000, 2, 502, 2);
    let out = dir.join("audio.bin");
    let r = convert_audio(&clips, &out).unwrap();
    assert_eq!((r.clips, r.format), (2, PcmFormat { sample_rate: 8000, bits: 16, channels: 2 }));
    let expected: Vec<u8> = a.iter().chain(&b).flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(std::fs::read(&out).unwrap(), expected, "bytes are the little-endian samples, clips in path order");
    let index: megabyte::documents::DocumentIndex =
        serde_json::from_slice(&std::fs::read(dir.join("audio.bin.documents.json")).unwrap()).unwrap();
    assert_eq!(index.starts, Some(vec![0, 2000]));
    assert_eq!(index.about["sample_rate"], 8000);

    // 8-bit: the stored unsigned bytes, silence 0x80.
    let p8 = dir.join("u8.wav");
    let mut w = hound::WavWriter::create(&p8, spec(11025, 8, 1)).unwrap();
    for x in [-128i8, -1, 0, 1, 127] {
        w.write_sample(x).unwrap();
    }
    w.finalize().unwrap();
    assert_eq!(read_wav(&p8).unwrap().1, vec![0u8, 127, 128, 129, 255]);

    // Write back: the same samples, the same header.
    let back = dir.join("back.wav");
    write_wav(&back, r.format, &expected[..2000]).unwrap(); // clip a: 1000 samples of 2 bytes
    let reader = hound::WavReader::open(&back).unwrap();
    assert_eq!(reader.spec(), spec(8000, 16, 2));
    let got: Vec<i16> = reader.into_samples::<i16>().map(|x| x.unwrap()).collect();
    assert_eq!(got, a);
}

#[test]
fn unsupported_and_mixed_audio_is_refused() {
    let dir = temp_dir("wav-bad");
    let refused = |input: &Path, needle: &str| {
        let out = dir.join("out.bin");
        let err = convert_audio(input, &out).unwrap_err().to_string();
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        assert!(!out.exists());
    };
    let float = dir.join("float.wav");
    let mut w = hound::WavWriter::create(
        &float,
        hound::WavSpec { channels: 1, sample_rate: 8000, bits_per_sample: 32, sample_format: hound::SampleFormat::Float },
    )
    .unwrap();
    w.write_sample(0.5f32).unwrap();
    w.finalize().unwrap();
    refused(&float, "floating-point");
    let wide = dir.join("24.wav");
    let mut w = hound::WavWriter::create(&wide, spec(8000, 24, 1)).unwrap();
    w.write_sample(5i32).unwrap();
    w.finalize().unwrap();
    refused(&wide, "only 8- or 16-bit");
    std::fs::write(dir.join("junk.wav"), b"RIFF nonsense").unwrap();
    refused(&dir.join("junk.wav"), "not a readable WAV");
    let mixed = dir.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    write_i16(&mixed.join("a.wav"), 8000, 1, 10, 1);
    write_i16(&mixed.join("b.wav"), 16000, 1, 10, 1);
    refused(&mixed, "one output holds one format");
    std::fs::create_dir_all(dir.join("none")).unwrap();
    refused(&dir.join("none"), "no .wav");
}

#[test]
fn generated_clips_are_playable_wav_of_the_requested_length() {
    assert_eq!(clip_bytes(PcmFormat { sample_rate: 8000, bits: 16, channels: 1 }, 0.5).unwrap(), 8000);
    assert_eq!(clip_bytes(PcmFormat { sample_rate: 8000, bits: 16, channels: 2 }, 0.001).unwrap(), 32);
    let dir = temp_dir("wav-gen");
    let clip = dir.join("clip.wav");
    write_i16(&clip, 8000, 1, 4000, 3);
    let data = dir.join("audio.bin");
    let (ok, stdout, stderr) = megabyte(&["data", "audio", s(&clip), s(&data)]);
    assert!(ok && stdout.contains("8000 Hz 16-bit mono"), "{stdout}{stderr}");
    let run = dir.join("run");
    let (ok, _, stderr) = megabyte(&["train", "--data", s(&data), "--out", s(&run), "--steps", "1", "--sample-bytes", "0", "--batch-size", "2"]);
    assert!(ok, "{stderr}");
    let out = dir.join("gen.wav");
    let (ok, _, stderr) =
        megabyte(&["generate", "--checkpoint", s(&run), "--wav", "30ms", "--sample-rate", "8000", "--bits", "16", "--out", s(&out)]);
    assert!(ok, "{stderr}");
    let reader = hound::WavReader::open(&out).unwrap();
    assert_eq!(reader.spec(), spec(8000, 16, 1));
    assert_eq!(reader.len(), 240, "30 ms at 8 kHz");
    // A prompt that ends inside a sample would shift every sample: refused.
    let (ok, _, stderr) = megabyte(&[
        "generate", "--checkpoint", s(&run), "--wav", "10ms", "--prompt", "abc", "--out", s(&dir.join("bad.wav")),
    ]);
    assert!(!ok && stderr.contains("sample boundary"), "{stderr}");
}
