//! The analyst commands, run as the real binary: `mapping test`, `mapping check`, `map`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tributary() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tributary"));
    c.env_remove("TRIBUTARY_CONFIG");
    c
}

#[test]
fn mapping_test_runs_every_fixture_of_the_library() {
    let out = tributary()
        .args(["mapping", "test"])
        .arg(repo().join("mappings/hl7v2"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap();
    assert!(summary.ends_with("passed, 0 failed"), "{summary}");
    let passed: usize = summary.split(' ').next().unwrap().parse().unwrap();
    assert!(passed >= 20, "{summary}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn mapping_check_and_test_point_at_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hl7v2");
    copy_dir(&repo().join("mappings/hl7v2"), &dir);
    // a fixture whose expected output no longer matches: a readable diff
    let exp = dir.join("messages/ADT_A03.expected.json");
    let text =
        std::fs::read_to_string(&exp)
            .unwrap()
            .replacen("\"finished\"", "\"in-progress\"", 1);
    std::fs::write(&exp, text).unwrap();
    let out = tributary()
        .args(["mapping", "test"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL  ") && stdout.contains("ADT_A03.hl7"),
        "{stdout}"
    );
    assert!(
        stdout.contains(".status: expected \"in-progress\", got \"finished\""),
        "{stdout}"
    );
    // a bad mapping file: file:line:col and a suggestion, exit 1
    let f = dir.join("datatypes/XPN.yaml");
    let text = std::fs::read_to_string(&f)
        .unwrap()
        .replace("  - set: family\n", "  - set: famly\n");
    std::fs::write(&f, text).unwrap();
    let out = tributary()
        .args(["mapping", "check"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("datatypes/XPN.yaml:5:10: `famly` is not an element of FHIR R4 HumanName — did you mean `family`?"), "{stderr}");
}

#[test]
fn map_prints_a_transaction_bundle_with_explain_and_unmapped() {
    let out = tributary()
        .args(["map", "--explain", "--unmapped", "--mapping"])
        .arg(repo().join("mappings/hl7v2"))
        .arg(repo().join("mappings/hl7v2/messages/ORU_R01.hl7"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let bundle: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(bundle["type"], "transaction");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("# lineage (ORU^R01"), "{stderr}");
    assert!(stderr.contains("<- OBX[1]-5\t"), "{stderr}");
    assert!(
        stderr.contains("non-empty source field(s) no rule consumed"),
        "{stderr}"
    );
}

#[test]
fn map_reports_a_period_end_it_leaves_out_by_path_never_by_value() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("reversed.hl7");
    // hand-written: discharged (PV1-45) years before admitted (PV1-44)
    let pv1 = format!(
        "PV1|1|I|4WEST^401^A^RIVERSIDE|||||||||||||||I|V90001{}|20261123081500-0600|20161123",
        "|".repeat(24)
    );
    let msg = format!(
        "MSH|^~\\&|SYNTH|RIVERSIDE|TRIBUTARY|HIE|20261123081500-0600||ADT^A01^ADT_A01|PER-1|P|2.5.1\rPID|1||MRN90001^^^RIVERSIDE^MR||Sample^Pat||19800101|F\r{pv1}\r"
    );
    std::fs::write(&input, msg).unwrap();
    let out = tributary()
        .args(["map", "--explain", "--mapping"])
        .arg(repo().join("mappings/hl7v2"))
        .arg(&input)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let bundle: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let enc = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Encounter")
        .unwrap();
    assert_eq!(
        enc["resource"]["period"],
        serde_json::json!({"start": "2026-11-23T08:15:00-06:00"})
    );
    assert!(
        stderr.contains("source value left out: PV1-45 (Encounter.period.end: end before start)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("<- PV1-45\t") && stderr.contains("left out: end before start"),
        "{stderr}"
    );
    assert!(!stderr.contains("2016"), "{stderr}");
}
