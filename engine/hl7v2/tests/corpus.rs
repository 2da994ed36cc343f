//! Every HL7 v2 sample in the shared corpus parses (as one message or as a batch), and the
//! message header is readable. Skips, saying so, when `../shared/corpus` is absent.

use std::path::{Path, PathBuf};
use tributary_hl7v2::{split_batch, Message};

fn corpus_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/hl7v2");
    dir.is_dir().then_some(dir)
}

fn hl7_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            hl7_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "hl7") {
            out.push(p);
        }
    }
}

#[test]
fn every_corpus_message_parses() {
    let Some(dir) = corpus_dir() else {
        eprintln!("SKIP: ../shared/corpus/hl7v2 not found; corpus conformance not checked");
        return;
    };
    let mut files = Vec::new();
    hl7_files(&dir, &mut files);
    files.sort();
    assert!(
        files.len() > 100,
        "expected the full corpus, found {} files",
        files.len()
    );
    let mut failures = Vec::new();
    let mut messages = 0;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let batch = match split_batch(&bytes) {
            Ok(b) => b,
            Err(e) => {
                failures.push(format!("{}: {e}", f.display()));
                continue;
            }
        };
        for r in batch.messages {
            match Message::parse(&bytes[r]) {
                Ok(m) => {
                    let h = m.header();
                    if h.message_type.is_empty() {
                        failures.push(format!("{}: MSH-9 is empty", f.display()));
                    }
                    messages += 1;
                }
                Err(e) => failures.push(format!("{}: {e}", f.display())),
            }
        }
    }
    eprintln!("parsed {messages} messages from {} files", files.len());
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
