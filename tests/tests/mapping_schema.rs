//! The JSON Schema that editors use for completion (`mappings/schema/mapping.schema.json`)
//! accepts every file of the shipped mapping library, checked by a validator nobody here wrote
//! (python `jsonschema`, installed by scripts/install-test-tools), and rejects a misspelt key —
//! so the schema cannot fall behind the language unnoticed.

use std::process::Command;
use tributary_e2e::{files_with_extension, repo_root};

const CHECK: &str = "import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
validator = jsonschema.Draft7Validator(schema)
for path in sys.argv[2:]:
    doc = yaml.safe_load(open(path))
    for e in validator.iter_errors(doc):
        print(path + ': ' + '/'.join(map(str, e.path)) + ': ' + e.message[:200])
";

#[test]
fn every_library_file_is_valid_against_the_mapping_schema_and_a_typo_is_not() {
    let python = repo_root().join("target/test-tools/kubernetes-validate-venv/bin/python");
    let usable = python.exists()
        && Command::new(&python)
            .args(["-c", "import jsonschema, yaml"])
            .status()
            .is_ok_and(|s| s.success());
    if !usable {
        assert!(
            std::env::var_os("TEST_REQUIRE_TOOLS").is_none(),
            "a test tool is missing but TEST_REQUIRE_TOOLS is set"
        );
        eprintln!("SKIP: python jsonschema not installed (scripts/install-test-tools)");
        return;
    }
    let schema = repo_root().join("mappings/schema/mapping.schema.json");
    let files = files_with_extension(&repo_root().join("mappings/hl7v2"), "yaml");
    assert!(files.len() >= 40, "{} mapping files", files.len());
    let run = |paths: &[std::path::PathBuf]| {
        let out = Command::new(&python)
            .args(["-c", CHECK])
            .arg(&schema)
            .args(paths)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let errors = run(&files);
    assert!(errors.is_empty(), "schema errors:\n{errors}");

    // The same check must fail on a copy with a misspelt key and on a bad id part.
    let dir = tempfile::tempdir().unwrap();
    let xcn =
        std::fs::read_to_string(repo_root().join("mappings/hl7v2/segments/XCN-Practitioner.yaml"))
            .unwrap();
    let typo = dir.path().join("typo.yaml");
    std::fs::write(&typo, xcn.replacen("rules:", "rulez:", 1)).unwrap();
    let bad_id = dir.path().join("bad-id.yaml");
    std::fs::write(&bad_id, xcn.replacen("id: [", "id: [[[\".1\"]], ", 1)).unwrap();
    let errors = run(&[typo.clone(), bad_id.clone()]);
    for f in [&typo, &bad_id] {
        assert!(
            errors.contains(&*f.to_string_lossy()),
            "{} passed the schema:\n{errors}",
            f.display()
        );
    }
}
