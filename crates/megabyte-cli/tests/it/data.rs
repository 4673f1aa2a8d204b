//! Byte streams over folders: every file's bytes, in path order, however many files.

use std::sync::Arc;

use megabyte::data::{ByteStream, Split, MAP_MIN_BYTES};

use crate::{random_bytes, temp_dir};

/// More files than Linux lets one process map (`vm.max_map_count`, 65,530 by default), with
/// two files large enough to be mapped among them: the stream is still their concatenation.
#[test]
fn a_folder_of_more_files_than_a_process_may_map_reads_as_their_concatenation() {
    let dir = temp_dir("many-files");
    let mut files = Vec::new();
    for d in 0..70 {
        let sub = dir.join(format!("d{d:02}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..1000 {
            let bytes = if (d, f) == (20, 500) || (d, f) == (69, 999) {
                random_bytes(MAP_MIN_BYTES as usize + 7 * d, d as u64)
            } else {
                random_bytes(1 + (d * 1000 + f) % 40, (d * 1000 + f) as u64)
            };
            let path = sub.join(format!("f{f:04}.bin"));
            std::fs::write(&path, &bytes).unwrap();
            files.push((path, bytes));
        }
    }
    files.sort();
    let whole: Vec<u8> = files.iter().flat_map(|(_, b)| b.iter().copied()).collect();

    let stream = ByteStream::open(&dir).unwrap();
    assert_eq!(stream.len(), whole.len() as u64);
    assert_eq!(stream.files().len(), files.len());
    assert!(stream.files().iter().zip(&files).all(|((p, n), (q, b))| p == q && *n == b.len() as u64), "files out of path order");
    let all = Split::all(Arc::new(stream));
    assert!(all.window(0, whole.len()).unwrap() == whole, "the stream differs from the files' concatenation");
    // Windows across file and part boundaries, and one running past the end (zero padded).
    for offset in [0, 39, 20_000, whole.len() as u64 / 3, whole.len() as u64 - 1_048_600, whole.len() as u64 - 10] {
        let got = all.window(offset, 5_000).unwrap();
        let end = (offset as usize + 5_000).min(whole.len());
        assert_eq!(&got[..end - offset as usize], &whole[offset as usize..end], "window at {offset}");
        assert!(got[end - offset as usize..].iter().all(|&b| b == 0));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
