//! The shipped example configuration is valid and equals the built-in defaults, so the file an
//! operator copies documents exactly what runs without it.

use std::process::Command;

#[test]
fn example_config_is_valid_and_documents_the_defaults() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/tributary.example.toml"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["config", "check", "--config", example])
        .env_remove("TRIBUTARY_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let defaults = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["config", "check"])
        .env_remove("TRIBUTARY_CONFIG")
        .output()
        .unwrap();
    assert!(defaults.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&defaults.stdout),
        "deploy/tributary.example.toml differs from the built-in defaults"
    );
}
