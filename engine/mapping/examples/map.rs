//! `cargo run -p tributary-mapping --example map -- DIR FILE.hl7` — quick manual check.
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let set = tributary_mapping::MappingSet::load(std::path::Path::new(&args[1]))?;
    let bytes = std::fs::read(&args[2])?;
    let msg = tributary_hl7v2::Message::parse(&bytes)?;
    let parsed = tributary_mapping::Parsed::new(&msg);
    let out = tributary_mapping::run(&set, &parsed, tributary_terminology::builtin())?;
    println!("{}", serde_json::to_string_pretty(&out.bundle)?);
    eprintln!("unconsumed: {:?}", out.unconsumed);
    eprintln!("warnings: {:?}", out.warnings);
    Ok(())
}
