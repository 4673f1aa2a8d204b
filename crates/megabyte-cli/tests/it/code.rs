//! Code as bytes: a folder of sources joined with the document separator and an index.

use megabyte::documents::DocumentIndex;
use megabyte_data::code::{join_code, SEPARATOR};

use crate::temp_dir;

#[test]
fn a_source_folder_joins_in_path_order_with_separators_and_offsets() {
    let dir = temp_dir("code");
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("b/deep")).unwrap();
    std::fs::create_dir_all(src.join(".git")).unwrap();
    let files = [("b/deep/z.py", "print('z')\n"), ("a.rs", "fn main() {}\n"), ("b/c.RS", "// c\n"), ("b/d.txt", "skip me")];
    for (name, text) in files {
        std::fs::write(src.join(name), text).unwrap();
    }
    std::fs::write(src.join(".git/config.rs"), "hidden").unwrap();
    let out = dir.join("code.bin");
    let r = join_code(&src, &out, &["rs".into(), ".py".into()]).unwrap();
    assert_eq!(r.files, 3);
    let bytes = std::fs::read(&out).unwrap();
    let expected = [&[SEPARATOR][..], b"fn main() {}\n", &[SEPARATOR], b"// c\n", &[SEPARATOR], b"print('z')\n"].concat();
    assert_eq!(bytes, expected);
    let index: DocumentIndex = serde_json::from_slice(&std::fs::read(DocumentIndex::sidecar(&out)).unwrap()).unwrap();
    let starts = index.document_starts().unwrap();
    assert_eq!(starts, vec![0, 14, 20]);
    assert!(starts.iter().all(|&s| bytes[s as usize] == SEPARATOR));
    assert_eq!(bytes.iter().filter(|&&b| b == SEPARATOR).count(), starts.len());
    assert_eq!(index.about["paths"][2], "b/deep/z.py");
    // The stream of the output file sees the same documents.
    let stream = megabyte::data::ByteStream::open(&out).unwrap();
    assert_eq!(stream.documents().unwrap(), starts);

    // A binary file (holding the separator), no matching files, and an existing output.
    std::fs::write(src.join("bin.rs"), b"ab\0cd").unwrap();
    let err = join_code(&src, &dir.join("x.bin"), &["rs".into()]).unwrap_err().to_string();
    assert!(err.contains("bin.rs") && err.contains("NUL"), "{err}");
    assert!(!dir.join("x.bin").exists());
    let err = join_code(&src, &dir.join("y.bin"), &["go".into()]).unwrap_err().to_string();
    assert!(err.contains("no files"), "{err}");
    let err = join_code(&src, &out, &["py".into()]).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), expected);
}
