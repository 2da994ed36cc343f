//! A client nobody here wrote: python `hl7`'s `mllp_send --loose` (pip package `hl7`) sends
//! corpus files to the real binary; every reply must be a positive ACK echoing MSH-10, and every
//! message must be journaled.

mod mllp_common;

use mllp_common::*;
use std::process::Command;
use tributary_core::StateKind;
use tributary_mllp::header::{is_batch, Header};

fn mllp_send_available() -> bool {
    Command::new("mllp_send")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn python_hl7_mllp_send_gets_positive_acks() {
    if !mllp_send_available() {
        // CI installs every test tool and sets TEST_REQUIRE_TOOLS=1: there, a missing tool fails.
        assert!(
            std::env::var_os("TEST_REQUIRE_TOOLS").is_none(),
            "a test tool is missing but TEST_REQUIRE_TOOLS is set"
        );
        eprintln!("SKIP: mllp_send not installed (pip install hl7)");
        return;
    }
    let Some(corpus) = corpus_dir() else {
        eprintln!("SKIP: ../shared/corpus/hl7v2 not found beside the repository");
        return;
    };
    // --loose requires files that start with "MSH|^~\&|" (no BOM, no batch envelope)
    let files: Vec<_> = corpus_files(&corpus)
        .into_iter()
        .filter(|f| {
            let b = std::fs::read(f).unwrap();
            b.starts_with(b"MSH|^~\\&|") && !is_batch(&b)
        })
        .collect();
    assert!(files.len() > 100, "only {} eligible files", files.len());
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("tributary.log");
    let server = Server::start(&data, &log, "", &[]);
    let mut control_ids = Vec::new();
    // eight python clients at a time
    for chunk in files.chunks(8) {
        let children: Vec<_> = chunk
            .iter()
            .map(|f| {
                Command::new("mllp_send")
                    .args(["--loose", "-p", &server.mllp.port().to_string(), "-f"])
                    .arg(f)
                    .arg("127.0.0.1")
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .expect("run mllp_send")
            })
            .collect();
        for (f, child) in chunk.iter().zip(children) {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "mllp_send failed for {}", f.display());
            let reply = String::from_utf8_lossy(&out.stdout).replace('\n', "\r");
            let bytes = std::fs::read(f).unwrap();
            let h = Header::read(&bytes).unwrap();
            let cid = String::from_utf8_lossy(h.control_id()).to_string();
            let expected = if h.enhanced_mode() { "CA" } else { "AA" };
            let msa = reply
                .split('\r')
                .find(|s| s.starts_with("MSA|"))
                .unwrap_or_else(|| panic!("no MSA in reply for {}: {reply:?}", f.display()));
            assert_eq!(
                msa.split('|').take(3).collect::<Vec<_>>(),
                vec!["MSA", expected, cid.as_str()],
                "{}",
                f.display()
            );
            control_ids.push(cid);
        }
    }
    server.stop();
    let stored: std::collections::HashSet<String> = journal_records(&data)
        .into_iter()
        .filter(|r| r.state.state.kind() == StateKind::Received)
        .filter_map(|r| r.envelope.meta.get("control_id").cloned())
        .collect();
    for cid in &control_ids {
        assert!(stored.contains(cid), "control id {cid} not journaled");
    }
    eprintln!(
        "{} files sent with mllp_send, all acknowledged and journaled",
        files.len()
    );
}
