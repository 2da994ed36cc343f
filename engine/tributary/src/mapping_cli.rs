//! Analyst commands: `tributary map`, `tributary mapping test|check|report`.

use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tributary_mapping::{fixtures, MappingSet, RunOptions};

/// Convert HL7 v2 messages to FHIR R4 Bundles with a mapping set, without a server.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  tributary map --mapping mappings/hl7v2 adt.hl7\n  tributary map --mapping mappings/hl7v2 --explain --unmapped adt.hl7\n  tributary map --mapping mappings/hl7v2 --out-dir out/ samples/*.hl7\n  tributary map --feed elr-lab oru.hl7   # with the variables mapping-set.yaml gives that feed\n  tributary map --mapping mappings/hl7v2 --report samples/*.hl7   # what the set leaves unmapped, over all samples\n  tributary map --report --json samples/*.hl7 | jq '.rows | length'"
)]
pub struct MapArgs {
    /// Mapping set directory.
    #[arg(long, short = 'm', default_value = "mappings/hl7v2")]
    pub mapping: PathBuf,
    /// Input message file(s): one HL7 v2 message, several, or FHS/BHS batches each.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Also print, per produced element, the source path and the rule (file:line) behind it.
    #[arg(long)]
    pub explain: bool,
    /// Also print every non-empty source field no rule consumed.
    #[arg(long)]
    pub unmapped: bool,
    /// Tenant for deterministic ids.
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Map as messages from this feed (the sending partner's id) are mapped: the variables
    /// `feeds:` of mapping-set.yaml gives it apply.
    #[arg(long)]
    pub feed: Option<String>,
    /// Write `<out-dir>/<input stem>.json` per input instead of printing (for batches:
    /// `<stem>.<n>.json`, or `<stem>.<batch>.<n>.json` for a file of several batches).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Instead of printing Bundles, print one table over all inputs: per message map, type and
    /// source field no rule consumed (or value left out), how many messages had it and an input
    /// that did — the table `tributary mapping report` gives for a running feed, for a folder
    /// of a new sender's sample messages.
    #[arg(long)]
    pub report: bool,
    /// With `--report`: print it as JSON (`{"rows": [...]}`, as `mapping report --json`).
    #[arg(long, requires = "report")]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum MappingCommand {
    /// Run every fixture (input .hl7 + .expected.json beside each message map); show diffs.
    #[command(
        after_help = "Examples:\n  tributary mapping test\n  tributary mapping test mappings/hl7v2\n  tributary mapping test --update   # rewrite expected outputs (review the git diff!)"
    )]
    Test {
        #[arg(default_value = "mappings/hl7v2")]
        dir: PathBuf,
        /// Write the produced Bundle as the expected output of every fixture.
        #[arg(long)]
        update: bool,
    },
    /// Load and check every mapping file without running anything.
    #[command(after_help = "Example:\n  tributary mapping check mappings/hl7v2")]
    Check {
        #[arg(default_value = "mappings/hl7v2")]
        dir: PathBuf,
    },
    /// Which source fields the running pipeline's mappings leave unconsumed (or values they leave
    /// out), per tenant, feed (sending partner) and message map: how many messages, first and
    /// last seen, an example message id. Paths and ids only, never values. Counts reach the data directory every
    /// `mapping.report_flush_secs` and at shutdown.
    #[command(
        after_help = "Examples:\n  tributary mapping report --data-dir /var/lib/tributary\n  tributary mapping report --config tributary.toml --tenant acme\n  tributary mapping report --feed new-lab   # what one sender's messages leave unmapped\n  tributary mapping report --json | jq '.rows[] | select(.count > 100)'\n  tributary journal show <EXAMPLE MESSAGE>   # the message behind a row"
    )]
    Report {
        #[command(flatten)]
        common: crate::cli::Common,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this feed (the sending partner's id).
        #[arg(long)]
        feed: Option<String>,
        /// Print JSON ({"rows": [...], "overflow": {tenant: n}}) instead of a table.
        #[arg(long)]
        json: bool,
        /// Most rows printed (highest counts first); 0 prints all.
        #[arg(long, default_value_t = 0)]
        limit: usize,
        #[command(flatten)]
        server: crate::cli::ServerArgs,
    },
}

fn load(dir: &Path) -> anyhow::Result<Result<MappingSet, ExitCode>> {
    match MappingSet::load(dir) {
        Ok(s) => Ok(Ok(s)),
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!(
                "{} error(s): mapping set {} not loaded",
                errors.0.len(),
                dir.display()
            );
            Ok(Err(ExitCode::from(1)))
        }
    }
}

pub fn map(args: MapArgs) -> anyhow::Result<ExitCode> {
    let set = match load(&args.mapping)? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let term = tributary_terminology::builtin();
    if let Some(feed) = args.feed.as_deref().filter(|f| !set.has_feed(f)) {
        let known = set.feeds().collect::<Vec<_>>().join(", ");
        eprintln!(
            "feed `{feed}` is not under `feeds:` of {}/mapping-set.yaml (it names: {})",
            args.mapping.display(),
            if known.is_empty() { "none" } else { &known }
        );
        return Ok(ExitCode::from(2));
    }
    let opts = RunOptions {
        tenant: &args.tenant,
        lineage: args.explain,
        feed: args.feed.as_deref(),
    };
    let (mut mapped, mut failed, mut count_errors) = (0usize, 0usize, 0usize);
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // The pipeline's own counting, so the table means what `mapping report` means.
    let fields = args.report.then(|| {
        tributary_pipeline::field_report::FieldAggregator::new(
            usize::MAX,
            std::time::Duration::MAX,
            std::time::Instant::now(),
        )
    });
    for input in &args.inputs {
        let all = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
        // A batch file (FHS/BHS, or several MSH) maps message by message.
        let batch = tributary_hl7v2::split_batch(&all)
            .ok()
            .filter(|b| b.messages.len() > 1 || b.enveloped);
        let ranges = match &batch {
            Some(b) => b.messages.clone(),
            None => std::iter::once(0..all.len()).collect(),
        };
        if let Some(b) = &batch {
            // the messages are still mapped: this tool only reads, and the count error is reported
            for m in b.count_mismatches() {
                count_errors += 1;
                eprintln!("error: {}: {m}", input.display());
            }
            if b.messages.is_empty() {
                eprintln!(
                    "{}: batch without messages: nothing to map",
                    input.display()
                );
            }
        }
        // a file of several batches names its outputs `<stem>.<batch>.<message>.json`
        let batch_of = |n: usize| {
            batch
                .as_ref()
                .filter(|b| b.batches.len() > 1)
                .and_then(|b| b.batch_of(n).map(|i| (i, n - b.batches[i].messages.start)))
        };
        let many = ranges.len() > 1;
        for (n, range) in ranges.into_iter().enumerate() {
            let bytes = &all[range];
            match set.map_bytes(bytes, term, &opts) {
                Err(e) => {
                    failed += 1;
                    eprintln!("{}: {e}", input.display());
                }
                Ok(m) => {
                    mapped += 1;
                    if let Some(agg) = &fields {
                        let example = match batch_of(n) {
                            Some((b, k)) => format!("{}#{}.{}", input.display(), b + 1, k + 1),
                            None if many => format!("{}#{}", input.display(), n + 1),
                            None => input.display().to_string(),
                        };
                        agg.observe(&tributary_pipeline::field_report::Observation {
                            tenant: &args.tenant,
                            feed: args.feed.as_deref().unwrap_or(""),
                            message_map: &m.message_map,
                            message_type: &m.message_type,
                            message_id: &example,
                            at: tributary_core::now_millis(),
                            fields: &tributary_pipeline::field_report::fields_of(&m),
                        });
                    }
                    let json = serde_json::to_string_pretty(&m.bundle())?;
                    match &args.out_dir {
                        Some(dir) => {
                            let stem = input.file_stem().unwrap_or_default().to_string_lossy();
                            let name = if let Some((b, k)) = batch_of(n) {
                                format!("{stem}.{}.{}.json", b + 1, k + 1)
                            } else if many {
                                format!("{stem}.{}.json", n + 1)
                            } else {
                                format!("{stem}.json")
                            };
                            std::fs::write(dir.join(name), json)?;
                        }
                        None if args.report => {}
                        None => println!("{json}"),
                    }
                    if args.explain {
                        eprintln!(
                            "# lineage ({}: {}, mapping set {})",
                            m.message_type, m.message_map, m.version
                        );
                        for l in &m.lineage {
                            eprintln!(
                                "{}\t<- {}\t{}",
                                l.element,
                                if l.source.is_empty() {
                                    "(constant)"
                                } else {
                                    &l.source
                                },
                                l.rule
                            );
                        }
                        for d in &m.dropped {
                            eprintln!(
                                "{}/{}.{}\t<- {}\t{}\tleft out: {}",
                                d.resource_type,
                                d.resource_id,
                                d.element,
                                if d.source.is_empty() {
                                    "(constant)"
                                } else {
                                    &d.source
                                },
                                d.rule,
                                d.reason
                            );
                        }
                    }
                    if args.unmapped {
                        eprintln!(
                            "# {} non-empty source field(s) no rule consumed in {}",
                            m.unconsumed.len(),
                            input.display()
                        );
                        for u in &m.unconsumed {
                            eprintln!("{u}");
                        }
                    }
                    for w in &m.warnings {
                        eprintln!("warning: {}: {w}", input.display());
                    }
                    for r in m.missing_required() {
                        eprintln!(
                            "warning: {}: not valid FHIR R4, the pipeline would fail it: required element missing: {r}",
                            input.display()
                        );
                    }
                    for d in &m.dropped {
                        eprintln!(
                            "warning: {}: {}: source value left out: {d}",
                            input.display(),
                            d.rule
                        );
                    }
                }
            }
        }
    }
    if let Some(agg) = fields {
        let rows = agg
            .take_pending()
            .deltas
            .into_iter()
            .map(|(key, stats)| tributary_storage::FieldReportRow { key, stats })
            .collect();
        let report = tributary_storage::FieldReport::from_rows(rows, Default::default());
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else if report.rows.is_empty() {
            println!("every non-empty source field of {mapped} message(s) was mapped");
        } else {
            print!("{}", report_table(&report, Columns::Samples));
        }
    }
    if mapped + failed > 1 || count_errors > 0 {
        eprintln!("{mapped} mapped, {failed} failed");
    }
    if count_errors > 0 {
        eprintln!("{count_errors} batch count error(s): BTS-1/FTS-1 disagree with the input");
    }
    Ok(if failed > 0 || count_errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn mapping(cmd: MappingCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        MappingCommand::Report {
            common,
            tenant,
            feed,
            json,
            limit,
            server,
        } => report(
            &common,
            &server,
            tenant.as_deref(),
            feed.as_deref(),
            json,
            limit,
        ),
        MappingCommand::Check { dir } => {
            let set = match load(&dir)? {
                Ok(s) => s,
                Err(code) => return Ok(code),
            };
            let types = set.message_types();
            println!(
                "mapping set {} ok: version {}, {} message type(s): {}",
                dir.display(),
                set.version,
                types.len(),
                types
                    .iter()
                    .map(|(t, _)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let missing: Vec<_> = set.message_maps_without_fixtures();
            for m in &missing {
                eprintln!("warning: {m} has no fixture (NAME.hl7 + NAME.expected.json beside it)");
            }
            Ok(ExitCode::SUCCESS)
        }
        MappingCommand::Test { dir, update } => {
            let set = match load(&dir)? {
                Ok(s) => s,
                Err(code) => return Ok(code),
            };
            let outcomes = fixtures::run_fixtures(&set, tributary_terminology::builtin());
            let (mut passed, mut failed) = (0, 0);
            for o in &outcomes {
                if update {
                    if let Some(actual) = &o.actual {
                        std::fs::write(&o.expected, serde_json::to_string_pretty(actual)? + "\n")?;
                        println!("updated {}", o.expected.display());
                        passed += 1;
                        continue;
                    }
                }
                if o.passed() {
                    passed += 1;
                    println!("ok    {}", o.input.display());
                } else {
                    failed += 1;
                    println!("FAIL  {}", o.input.display());
                    if let Some(e) = &o.error {
                        println!("      {e}");
                    }
                    for d in o.differences.iter().take(50) {
                        println!("      {d}");
                    }
                    if o.differences.len() > 50 {
                        println!("      … and {} more", o.differences.len() - 50);
                    }
                }
            }
            let missing = set.message_maps_without_fixtures();
            for m in &missing {
                failed += 1;
                println!("FAIL  {m}: no fixture");
            }
            println!("{passed} passed, {failed} failed");
            Ok(if failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

fn report(
    common: &crate::cli::Common,
    server: &crate::cli::ServerArgs,
    tenant: Option<&str>,
    feed: Option<&str>,
    json: bool,
    limit: usize,
) -> anyhow::Result<ExitCode> {
    let config = common.load()?;
    let mut report = match crate::cli::unless_served(crate::cli::open_db(&config))? {
        Some(db) => tributary_storage::FieldReportStore::new(db).read(tenant)?,
        None => crate::cli::block_on(crate::remote::mapping_report(&config, server, tenant))?,
    };
    if let Some(feed) = feed {
        report.rows.retain(|r| r.key.feed == feed);
    }
    if limit > 0 {
        report.rows.truncate(limit);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    if report.rows.is_empty() {
        println!("no unconsumed or left-out source fields recorded");
    } else {
        print!("{}", report_table(&report, Columns::Feed));
    }
    for (t, n) in &report.overflow {
        println!(
            "tenant {t}: {n} observation(s) of further fields not counted \
             (over mapping.report_max_fields distinct fields)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Which columns [`report_table`] prints.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Columns {
    /// A running feed's report: with the tenant, when each field was first and last seen, and
    /// a message id.
    Feed,
    /// `tributary map --report` over sample files: the example is an input file (and the
    /// message's place in a batch); no tenant or times.
    Samples,
}

/// The report as an aligned text table, rows as given (highest count first).
pub fn report_table(report: &tributary_storage::FieldReport, columns: Columns) -> String {
    let day = |ms: i64| {
        let s = tributary_core::format_rfc3339_millis(ms);
        // to the second: `2026-11-23T08:00:00Z`
        match s.find('.') {
            Some(i) => format!("{}Z", &s[..i]),
            None => s,
        }
    };
    // tenant, feed, first seen and last seen: a running feed's columns only
    let feed_only = [1, 2, 7, 8];
    let keep = |i: &usize| columns == Columns::Feed || !feed_only.contains(i);
    let example = match columns {
        Columns::Feed => "EXAMPLE MESSAGE",
        Columns::Samples => "EXAMPLE INPUT",
    };
    let header = [
        "COUNT",
        "TENANT",
        "FEED",
        "MESSAGE MAP",
        "TYPE",
        "KIND",
        "FIELD",
        "FIRST SEEN",
        "LAST SEEN",
        example,
    ];
    let mut lines: Vec<Vec<String>> = vec![header
        .iter()
        .enumerate()
        .filter(|(i, _)| keep(i))
        .map(|(_, h)| h.to_string())
        .collect()];
    for r in &report.rows {
        let field = if r.key.reason.is_empty() {
            r.key.path.clone()
        } else {
            format!("{} ({})", r.key.path, r.key.reason)
        };
        let cells = [
            r.stats.count.to_string(),
            r.key.tenant.clone(),
            if r.key.feed.is_empty() {
                "-".to_string()
            } else {
                r.key.feed.clone()
            },
            r.key.message_map.clone(),
            r.key.message_type.clone(),
            r.key.kind.to_string(),
            field,
            day(r.stats.first_seen),
            day(r.stats.last_seen),
            r.stats.example_message.clone(),
        ];
        lines.push(
            cells
                .into_iter()
                .enumerate()
                .filter(|(i, _)| keep(i))
                .map(|(_, c)| c)
                .collect(),
        );
    }
    let mut widths = vec![0usize; lines[0].len()];
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, &w))| {
                if i == 0 {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
