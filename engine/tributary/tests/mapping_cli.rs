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

#[test]
fn mapping_report_prints_the_stored_field_counts_as_a_table_and_as_json() {
    use tributary_storage::{Db, DbOptions, FieldKey, FieldKind, FieldReportStore, FieldStats};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let key = |tenant: &str, path: &str, kind: FieldKind, reason: &str| FieldKey {
        tenant: tenant.into(),
        message_map: "ADT_A01.yaml".into(),
        message_type: "ADT^A01".into(),
        kind,
        path: path.into(),
        reason: reason.into(),
        // the new sender's field; counts stored before feeds were counted apart have none
        feed: match path {
            "ZXT-2" => "new-lab".into(),
            "PID-13" => String::new(),
            _ => "riverside".into(),
        },
    };
    let stats = |count, example: &str| FieldStats {
        count,
        first_seen: 1_790_000_000_000,
        last_seen: 1_790_000_060_000,
        example_message: example.into(),
    };
    {
        let db = Db::open(&data, DbOptions::default()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(FieldReportStore::new(db).merge(
            vec![
                (
                    key("acme", "PID-11.7", FieldKind::Unconsumed, ""),
                    stats(3, "m-3"),
                ),
                (
                    key("acme", "ZXT-2", FieldKind::Unconsumed, ""),
                    stats(120, "m-120"),
                ),
                (
                    key(
                        "acme",
                        "PV1-45",
                        FieldKind::LeftOut,
                        "Encounter.period.end: end before start",
                    ),
                    stats(7, "m-7"),
                ),
                (
                    key("other", "PID-13", FieldKind::Unconsumed, ""),
                    stats(500, "o-1"),
                ),
            ],
            vec![("acme".into(), 2)],
        ))
        .unwrap();
    }

    let out = tributary()
        .args(["mapping", "report", "--tenant", "acme", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].contains("COUNT") && lines[0].contains("FEED") && lines[0].contains("FIELD"),
        "{stdout}"
    );
    // highest count first; the other tenant is not shown
    assert!(
        lines[1].trim_start().starts_with("120 ")
            && lines[1].contains("ZXT-2")
            && lines[1].contains(" new-lab "),
        "{stdout}"
    );
    assert!(
        lines[2].contains("PV1-45 (Encounter.period.end: end before start)")
            && lines[2].contains("left_out")
            && lines[2].contains("m-7"),
        "{stdout}"
    );
    assert!(
        lines[3].contains("PID-11.7") && lines[3].contains("2026-09-21T"),
        "{stdout}"
    );
    assert!(!stdout.contains("PID-13"), "{stdout}");
    assert!(stdout.contains("tenant acme: 2 observation(s)"), "{stdout}");

    // one sender's fields
    let out = tributary()
        .args(["mapping", "report", "--feed", "new-lab", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.contains("ADT_A01.yaml"))
            .count(),
        1,
        "{stdout}"
    );
    assert!(stdout.contains("ZXT-2"), "{stdout}");

    let out = tributary()
        .args(["mapping", "report", "--json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["tenant"], "other");
    assert_eq!(rows[0]["path"], "PID-13");
    assert_eq!(rows[0]["feed"], "");
    assert_eq!(rows[1]["feed"], "new-lab");
    assert_eq!(rows[0]["count"], 500);
    assert_eq!(rows[1]["kind"], "unconsumed");
    assert_eq!(rows[1]["example_message"], "m-120");
    assert_eq!(v["overflow"]["acme"], 2);

    // an empty data directory says so
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    let out = tributary()
        .args(["mapping", "report", "--data-dir"])
        .arg(tmp.path().join("empty"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no unconsumed or left-out"));
}

#[test]
fn map_keeps_the_batches_of_a_file_apart_and_reports_counts_and_empty_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let adt = std::fs::read_to_string(repo().join("mappings/hl7v2/messages/ADT_A01.hl7")).unwrap();
    let write = |name: &str, text: String| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let map = |input: &Path, out_dir: Option<&Path>| {
        let mut c = tributary();
        c.args(["map", "--mapping"])
            .arg(repo().join("mappings/hl7v2"));
        if let Some(d) = out_dir {
            c.arg("--out-dir").arg(d);
        }
        let out = c.arg(input).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), out.stdout, stderr)
    };
    // two batches: each output named by its batch
    let two = write(
        "two.hl7",
        format!("FHS|^~\\&|A\rBHS|^~\\&|A|||||||||B1\r{adt}BTS|1\rBHS|^~\\&|A|||||||||B2\r{adt}BTS|1\rFTS|2\r"),
    );
    let out_dir = tmp.path().join("out");
    let (code, _, stderr) = map(&two, Some(&out_dir));
    assert_eq!(code, Some(0), "{stderr}");
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["two.1.1.json", "two.2.1.json"]);
    // an empty batch says so
    let empty = write(
        "empty.hl7",
        "FHS|^~\\&|A\rBHS|^~\\&|A\rBTS|0\rFTS|1\r".into(),
    );
    let (code, stdout, stderr) = map(&empty, None);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("empty.hl7: batch without messages: nothing to map"),
        "{stderr}"
    );
    // a BTS-1 that disagrees is an error; the message is still mapped
    let short = write("short.hl7", format!("BHS|^~\\&|A\r{adt}BTS|2\r"));
    let (code, stdout, stderr) = map(&short, None);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("error: ")
            && stderr.contains("short.hl7: batch 1: BTS-1 declares 2 message(s), 1 received"),
        "{stderr}"
    );
    let bundle: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(bundle["type"], "transaction");
}

/// `map --report` over several inputs prints one table instead of Bundles: per message map, type
/// and field no rule consumed, in how many of the messages, and an input that had it.
#[test]
fn map_report_counts_unconsumed_fields_over_all_inputs() {
    let dir = repo().join("mappings/hl7v2/messages");
    let report = |extra: &[&str]| {
        tributary()
            .args(["map", "--report"])
            .args(extra)
            .arg("--mapping")
            .arg(repo().join("mappings/hl7v2"))
            .args(
                [
                    "ORU_R01.hl7",
                    "ORU_R01.two-patients.hl7",
                    "ORU_R01.ordering-facility.hl7",
                ]
                .map(|f| dir.join(f)),
            )
            .output()
            .unwrap()
    };
    let out = report(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains("\"resourceType\""),
        "no Bundle printed: {stdout}"
    );
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap()
        .split("  ")
        .filter(|c| !c.is_empty())
        .map(str::trim)
        .collect();
    assert_eq!(
        header,
        [
            "COUNT",
            "MESSAGE MAP",
            "TYPE",
            "KIND",
            "FIELD",
            "EXAMPLE INPUT"
        ]
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    let row = |field: &str| rows.iter().find(|r| r[4] == field).cloned();
    // the performing lab's name type code is only in the ordering-facility sample
    let obx = row("OBX-23.2").expect("OBX-23.2 reported");
    assert_eq!(obx[0], "1");
    assert_eq!(obx[2], "ORU^R01");
    assert!(obx[5].ends_with("ORU_R01.ordering-facility.hl7"), "{obx:?}");
    // NTE-2 (source of comment) is in two of the three, counted once per message
    assert_eq!(row("NTE-2").expect("NTE-2 reported")[0], "2");
    // highest count first
    let counts: Vec<u64> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
    assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");
    // the same rows as JSON
    let out = report(&["--json"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let json_rows = json["rows"].as_array().unwrap();
    assert_eq!(json_rows.len(), rows.len());
    let nte = json_rows.iter().find(|r| r["path"] == "NTE-2").unwrap();
    assert_eq!(nte["count"], 2, "{nte}");
}

/// `tributary map --feed NAME` maps a sample as that feed's messages are mapped (its `feeds:`
/// variables); a feed the set does not name is an error naming those it does, not a silent
/// run without them.
#[test]
fn a_feed_s_variables_apply_to_map_and_to_fixtures_named_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hl7v2");
    copy_dir(&repo().join("mappings/hl7v2"), &dir);
    let settings = dir.join("mapping-set.yaml");
    let text = std::fs::read_to_string(&settings).unwrap()
        + "feeds:\n  elr-lab:\n    vars:\n      result_category: laboratory\n";
    std::fs::write(&settings, text).unwrap();
    let input = dir.join("messages/ORU_R01.value-types.hl7");
    let map = |feed: Option<&str>| {
        let mut cmd = tributary();
        cmd.arg("map").arg("--mapping").arg(&dir);
        if let Some(f) = feed {
            cmd.args(["--feed", f]);
        }
        cmd.arg(&input).output().unwrap()
    };
    let categories_of = |bundle: &serde_json::Value| -> Vec<String> {
        bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["resource"]["resourceType"] == "Observation")
            .map(|e| e["resource"]["category"][0]["coding"][0]["code"].to_string())
            .collect()
    };
    let categories = |out: &std::process::Output| -> Vec<String> {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        categories_of(&serde_json::from_slice(&out.stdout).unwrap())
    };
    let with = categories(&map(Some("elr-lab")));
    assert!(
        with.len() >= 3 && with.iter().all(|c| c == "\"laboratory\""),
        "{with:?}"
    );
    let without = categories(&map(None));
    assert!(without.iter().all(|c| c == "null"), "{without:?}");

    let unknown = map(Some("elr-lb"));
    assert_eq!(unknown.status.code(), Some(2));
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        err.contains("feed `elr-lb` is not under `feeds:`") && err.contains("elr-lab"),
        "{err}"
    );

    // a fixture named after the feed is mapped as that feed's messages are
    std::fs::copy(&input, dir.join("messages/ORU_R01.elr-lab.hl7")).unwrap();
    let test = |update: bool| {
        let mut cmd = tributary();
        cmd.args(["mapping", "test"]);
        if update {
            cmd.arg("--update");
        }
        cmd.arg(&dir).output().unwrap()
    };
    assert!(test(true).status.success());
    let expected: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("messages/ORU_R01.elr-lab.expected.json")).unwrap(),
    )
    .unwrap();
    let fixture = categories_of(&expected);
    assert!(
        fixture.len() >= 3 && fixture.iter().all(|c| c == "\"laboratory\""),
        "{fixture:?}"
    );
    let again = test(false);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success()
            && stdout.contains("ok    ")
            && stdout.contains("ORU_R01.elr-lab.hl7"),
        "{stdout}"
    );
}
