use crate::config::Config;
use crate::remote;
use crate::selection::{self, parse_time, Selection};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tributary_core::MessageId;
use tributary_storage::{Db, DbOptions, FjallJournal, Journal};

#[derive(Parser, Debug)]
#[command(
    name = "tributary",
    version,
    about = "Healthcare integration engine: HL7 v2, C-CDA, X12 and FHIR feeds in; FHIR R4 and events out.",
    after_help = "Examples:\n  tributary serve                         # embedded default, ./tributary-data\n  tributary serve --config tributary.toml\n  tributary config check --config tributary.toml\n  tributary journal list --state failed"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where to find the configuration and the data directory; shared by every subcommand.
#[derive(Args, Debug, Clone, Default)]
pub struct Common {
    /// Configuration file (TOML). Without it, defaults apply (see deploy/tributary.example.toml).
    #[arg(long, short = 'c', env = "TRIBUTARY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Data directory; overrides `data_dir` from the config.
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Log format: pretty or json; overrides `log.format`.
    #[arg(long, global = true)]
    pub log_format: Option<String>,
}

impl Common {
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
        if let Some(f) = &self.log_format {
            config.log.format = f.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run every configured component in one process (HTTP facade, MLLP listener, pipeline).
    #[command(
        after_help = "Examples:\n  tributary serve\n  tributary serve --data-dir /var/lib/tributary --http-listen 0.0.0.0:8080\n  TRIBUTARY_LOG=debug tributary serve --log-format json"
    )]
    Serve(ServeArgs),
    /// Check a configuration file without starting anything.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect the message journal: list, show, stats.
    #[command(subcommand)]
    Journal(JournalCommand),
    /// Convert HL7 v2 message files to FHIR R4 Bundles with a mapping set (no server needed).
    Map(crate::mapping_cli::MapArgs),
    /// Work on mapping sets: run fixtures (`test`), check files (`check`).
    #[command(subcommand)]
    Mapping(crate::mapping_cli::MappingCommand),
    /// Queue failed (or selected) messages for mapping again, e.g. after fixing a mapping file.
    #[command(
        after_help = "Examples:\n  tributary replay --failed\n  tributary replay 0193f0c2-7a9e-7c4e-9d2b-1f2a3b4c5d6e\n  tributary replay --stale --type ORU --since 2026-11-30 --dry-run\n  tributary replay --partner general-lab --type ADT^A08 --mapped-by 3f9a1c\n\nWith `tributary serve` running, the command asks the server (admin API); otherwise the server maps what was queued when it next starts."
    )]
    Replay(ReplayArgs),
    /// Load generators and storage benchmarks.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Issue access tokens signed by the local key in the data directory.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Verify and export the tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Revoke consents / grants: tokens issued under them fail from the next request on.
    #[command(subcommand)]
    Consent(ConsentCommand),
    /// Copy the data directory (store, journal, outbox, audit log, keys) into a new directory
    /// that `tributary serve --data-dir` can run on as it is.
    #[command(
        after_help = "Examples:\n  tributary backup --to /backups/tributary-2026-12-07     # server stopped\n  tributary backup --config /etc/tributary/tributary.toml  # server running: it writes to backup.dir\n\nWith `tributary serve` running, the server takes the copy while it serves (POST /admin/backup), into a new directory under `backup.dir`. The copy holds the local signing key: keep it as safe as the data directory."
    )]
    Backup(BackupArgs),
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    pub common: Common,
    /// The new directory (must not exist, or be empty; outside the data directory). Only when
    /// no server runs on the data directory: a running server writes to `backup.dir`.
    #[arg(long, value_name = "DIR")]
    pub to: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Sign a token with the data directory's local key (created on first use). The token is the
    /// last line printed.
    #[command(
        after_help = "Examples:\n  tributary token issue --client my-app --scope \"user/*.rs\"\n  tributary token issue --client portal --scope \"patient/*.rs\" --patient p1 --tenant acme\n  TOKEN=$(tributary token issue --client ops --scope \"system/*.cruds\" | tail -1)\n  curl -H \"Authorization: Bearer $TOKEN\" http://127.0.0.1:8080/fhir/Patient"
    )]
    Issue(IssueArgs),
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    #[command(flatten)]
    pub common: Common,
    /// Client id (`client_id` claim): rate limits and audit records are per client.
    #[arg(long)]
    pub client: String,
    /// SMART scopes, space separated: "patient/Observation.rs user/*.read system/Patient.cruds".
    #[arg(long)]
    pub scope: String,
    /// Patient context (a Patient resource id): patient/ scopes are narrowed to it.
    #[arg(long)]
    pub patient: Option<String>,
    /// Tenant (default: `default_tenant` from the config).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Role: one of `facade.auth.roles` (view, edit, admin, audit, clinician by default).
    #[arg(long)]
    pub role: Option<String>,
    /// User id (`sub`); defaults to the client id.
    #[arg(long)]
    pub sub: Option<String>,
    /// Consent / grant id: revoking it (`tributary consent revoke`) invalidates the token.
    #[arg(long)]
    pub grant: Option<String>,
    /// Lifetime in seconds (negative values issue an already expired token, for testing).
    #[arg(long, default_value_t = 3600, allow_hyphen_values = true)]
    pub ttl: i64,
    /// Audience; defaults to the first of `facade.auth.audiences`.
    #[arg(long)]
    pub audience: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Walk the hash chain; exit 1 naming the first bad record if anything was edited, deleted
    /// or reordered.
    #[command(
        after_help = "Example:\n  tributary audit verify --data-dir /var/lib/tributary\n\nWith `tributary serve` running, the server verifies (GET /admin/audit/verify) and this prints its answer."
    )]
    Verify {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print audit records as JSON lines (each with its seq and prev hash) for a SIEM; works
    /// beside a running `tributary serve` (it reads the log's files, up to the durable head).
    #[command(
        after_help = "Examples:\n  tributary audit export --since 2026-11-01\n  tributary audit export --since 2026-11-23T08:00:00Z --until 2026-11-24 > audit.jsonl"
    )]
    Export {
        #[command(flatten)]
        common: Common,
        /// RFC 3339 time or YYYY-MM-DD (inclusive)
        #[arg(long)]
        since: Option<String>,
        /// RFC 3339 time or YYYY-MM-DD (exclusive)
        #[arg(long)]
        until: Option<String>,
    },
    /// Prune audit records older than a cut-off now (the server must be stopped; `serve` does
    /// this itself every `audit.prune_interval_secs` when `audit.retention_days` > 0). The chain
    /// stays verifiable from the stored anchor. Export first if the records must be archived.
    #[command(
        after_help = "Examples:\n  tributary audit export --until 2026-01-01 > audit-2025.jsonl && tributary audit prune --before 2026-01-01\n  tributary audit prune   # uses audit.retention_days from the config"
    )]
    Prune {
        #[command(flatten)]
        common: Common,
        /// RFC 3339 time or YYYY-MM-DD: records before it go. Default: now − audit.retention_days.
        #[arg(long)]
        before: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConsentCommand {
    /// Durably revoke a consent / grant id (matched against tokens' `grant` and `jti` claims),
    /// for one tenant's tokens or, without `--tenant`, for every tenant's.
    #[command(
        after_help = "Examples:\n  tributary consent revoke consent-2026-0042 --tenant north\n  tributary consent revoke consent-2026-0042   # every tenant"
    )]
    Revoke {
        #[command(flatten)]
        common: Common,
        id: String,
        /// Only this tenant's tokens (the admin API always revokes for the caller's tenant).
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: Common,
    /// HTTP listen address; overrides `http.listen`.
    #[arg(long)]
    pub http_listen: Option<String>,
    /// MLLP listen address; overrides `mllp.listen` ("" disables).
    #[arg(long)]
    pub mllp_listen: Option<String>,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub common: Common,
    /// Replay every message in state `failed` (the same as `--state failed`).
    #[arg(long, conflicts_with = "state")]
    pub failed: bool,
    #[command(flatten)]
    pub select: Selection,
    /// List what would be replayed; queue nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// How a command reaches a running `tributary serve`, which holds the data directory.
#[derive(Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// Base URL of the running server (default: http:// and `http.listen` from the config).
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// A bearer token with the admin role, or the audit role for `audit verify` (default: one
    /// signed with the local key in the data directory, valid for two minutes, when
    /// `facade.auth.local_key` is on).
    #[arg(long, env = "TRIBUTARY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed an `https` server's certificate, when the system's roots
    /// do not include it.
    #[arg(long, value_name = "PEM")]
    pub cacert: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Parse and validate; prints the effective configuration as TOML.
    #[command(
        after_help = "Example:\n  tributary config check --config deploy/tributary.example.toml"
    )]
    Check(Common),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    select: Selection,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Subcommand, Debug)]
pub enum JournalCommand {
    /// List messages (id, received time, state, attempts) — never their content.
    #[command(
        after_help = "Examples:\n  tributary journal list --state failed\n  tributary journal list --since 2026-11-01T00:00:00Z --limit 50"
    )]
    List(Box<ListArgs>),
    /// Show one message's metadata and state history; `--payload` prints its raw bytes.
    Show {
        #[command(flatten)]
        common: Common,
        id: String,
        /// Print the raw message (contains PHI: for inspection by authorised staff only). Read
        /// from the data directory only, never through the admin API.
        #[arg(long)]
        payload: bool,
        /// Through a running server: the tenant whose message it is (default: the default tenant).
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Head sequence number and approximate message count.
    Stats(Common),
}

/// Every command but `serve` works on a data directory that `serve` made. One that does not
/// exist is a wrong `--data-dir`/`--config` (or a relative path from another directory): making
/// an empty one would answer "0 records", "revoked" or a token its server never trusts.
pub fn require_data_dir(config: &Config) -> anyhow::Result<()> {
    if config.data_dir.is_dir() {
        return Ok(());
    }
    anyhow::bail!(
        "data directory {} does not exist: pass the server's --data-dir or --config \
         (`tributary serve` creates it)",
        config.data_dir.display()
    )
}

pub fn open_db(config: &Config) -> anyhow::Result<Db> {
    require_data_dir(config)?;
    Db::open(&config.data_dir, DbOptions::default())
        .with_context(|| format!("opening data directory {}", config.data_dir.display()))
}

fn open_journal(config: &Config) -> anyhow::Result<FjallJournal> {
    let db = open_db(config)?;
    Ok(FjallJournal::new(
        db,
        config.journal.dedup_window_secs as i64 * 1000,
    ))
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let mut config = args.common.load()?;
            if let Some(a) = args.http_listen {
                config.http.listen = a;
            }
            if let Some(a) = args.mllp_listen {
                config.mllp.listen = a;
            }
            config.validate()?;
            crate::logging::init(&config.log.format, &config.log.level);
            crate::serve::serve(config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check(common)) => {
            let config = common.load()?;
            let mut shown = toml::Value::try_from(&config)?;
            redact_secrets(&mut shown);
            println!("{}", toml::to_string_pretty(&shown)?);
            eprintln!("config ok");
            Ok(ExitCode::SUCCESS)
        }
        Command::Journal(cmd) => journal(cmd),
        Command::Bench(cmd) => crate::bench::run(cmd),
        Command::Map(args) => crate::mapping_cli::map(args),
        Command::Mapping(cmd) => crate::mapping_cli::mapping(cmd),
        Command::Replay(args) => replay(args),
        Command::Token(TokenCommand::Issue(args)) => issue_token(args),
        Command::Audit(cmd) => audit(cmd),
        Command::Backup(args) => backup(args),
        Command::Consent(ConsentCommand::Revoke { common, id, tenant }) => {
            let config = common.load()?;
            require_data_dir(&config)?;
            let path = tributary_facade::revocation::revoke_in_data_dir(
                &config.data_dir,
                tenant.as_deref(),
                &id,
            )?;
            let scope =
                tenant.map_or_else(|| "every tenant".to_string(), |t| format!("tenant {t}"));
            eprintln!("revoked {id} for {scope} (list: {})", path.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Replaces secrets in a config about to be printed: values of keys that name one (passwords,
/// secrets, tokens) and the password of a URL's `user:password@`. File paths stay (they are
/// where secrets are kept, not secrets).
fn redact_secrets(v: &mut toml::Value) {
    const REDACTED: &str = "<redacted>";
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                let k = k.to_ascii_lowercase();
                let secret = !["_file", "_url", "_secs"].iter().any(|s| k.ends_with(s))
                    && ["password", "secret", "token"]
                        .iter()
                        .any(|s| k.contains(s));
                match v {
                    toml::Value::String(s) if secret && !s.is_empty() => *s = REDACTED.into(),
                    _ => redact_secrets(v),
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(redact_secrets),
        toml::Value::String(s) => {
            if let Some((scheme, rest)) = s.split_once("://") {
                let authority_end = rest.find('/').unwrap_or(rest.len());
                if let Some(at) = rest[..authority_end].rfind('@') {
                    if let Some(colon) = rest[..at].find(':') {
                        *s = format!("{scheme}://{}:{REDACTED}{}", &rest[..colon], &rest[at..]);
                    }
                }
            }
        }
        _ => {}
    }
}

fn issue_token(args: IssueArgs) -> anyhow::Result<ExitCode> {
    let config = args.common.load()?;
    let auth = &config.facade.auth;
    if !auth.local_key {
        anyhow::bail!("facade.auth.local_key is false: tokens come from your identity provider");
    }
    require_data_dir(&config)?;
    let key = tributary_facade::LocalSigningKey::load_or_create(&config.data_dir)?;
    let req = tributary_facade::IssueRequest {
        client_id: args.client,
        scope: args.scope,
        subject: args.sub,
        patient: args.patient,
        tenant: args.tenant,
        role: args.role,
        grant: args.grant,
        ttl_secs: args.ttl,
        issuer: auth.issuers[0].clone(),
        audience: args.audience.unwrap_or_else(|| auth.audiences[0].clone()),
        clock_offset_secs: 0,
    };
    let token = tributary_facade::auth::issue(&key, &req)?;
    eprintln!(
        "token for client {} (kid {}, expires in {} s):",
        req.client_id, key.kid, req.ttl_secs
    );
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

fn audit(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify { common, server } => {
            let config = common.load()?;
            let db = match unless_served(open_db(&config))? {
                Some(db) => db,
                None => {
                    let v = block_on(remote::audit_verify(&config, &server))?;
                    if v.intact {
                        println!(
                            "audit chain intact: {} records, head {} (verified by the running server)",
                            v.entries.unwrap_or(0),
                            v.head_hash.unwrap_or_default()
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                    println!(
                        "AUDIT CHAIN BROKEN at record {}: {}",
                        v.first_bad_record.unwrap_or(0),
                        v.reason.unwrap_or_default()
                    );
                    return Ok(ExitCode::from(1));
                }
            };
            let log = tributary_storage::AuditLog::new(db);
            let anchor = log.anchor()?;
            match log.verify()? {
                Ok(report) => {
                    println!(
                        "audit chain intact: {} records, head {}",
                        report.entries, report.head_hash
                    );
                    if let Some(a) = anchor {
                        println!(
                            "records 1..={} were pruned by retention; verified from their anchor",
                            a.seq
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(bad) => {
                    println!("AUDIT CHAIN BROKEN at record {}: {}", bad.seq, bad.reason);
                    Ok(ExitCode::from(1))
                }
            }
        }
        AuditCommand::Prune { common, before } => {
            let config = common.load()?;
            let now = tributary_core::now_millis();
            let cutoff = match parse_time("--before", &before)? {
                Some(t) => t,
                None if config.audit.retention_days > 0 => {
                    now - (config.audit.retention_days as i64).saturating_mul(86_400_000)
                }
                None => anyhow::bail!(
                    "audit.retention_days is 0 (keep forever): give --before to prune anyway"
                ),
            };
            let db = open_db(&config)?;
            let log = tributary_storage::AuditLog::new(db);
            let stats = block_on(log.prune_before(cutoff, now))?;
            match stats.anchor {
                Some(a) => println!(
                    "pruned {} audit records; the chain now starts after record {a}",
                    stats.pruned
                ),
                None => println!("no audit records older than the cut-off"),
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export {
            common,
            since,
            until,
        } => {
            let config = common.load()?;
            let since = parse_time("--since", &since)?.unwrap_or(i64::MIN);
            let until = parse_time("--until", &until)?.unwrap_or(i64::MAX);
            use std::io::Write;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let mut written: std::io::Result<()> = Ok(());
            let mut export = |e: tributary_storage::AuditEntry| {
                // Facade records carry `time` (ms), ingress records `at` (RFC 3339).
                let t = tributary_storage::record_time(&e.body).unwrap_or(i64::MIN);
                if t >= since && t < until {
                    written = serde_json::to_writer(&mut out, &e)
                        .map_err(std::io::Error::from)
                        .and_then(|_| out.write_all(b"\n"));
                }
                written.is_ok()
            };
            match unless_served(open_db(&config))? {
                Some(db) => tributary_storage::AuditLog::new(db).for_each_after(0, &mut export)?,
                // The server appends while this reads; the log's files are readable beside it.
                None => {
                    tributary_storage::for_each_durable_record(&config.data_dir, &mut export)?;
                    eprintln!("exported the records the running server had made durable when the export started");
                }
            }
            written?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn journal(cmd: JournalCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        JournalCommand::List(args) => {
            let ListArgs {
                common,
                mut select,
                server,
            } = *args;
            let config = common.load()?;
            let limit = *select.limit.get_or_insert(100);
            let rows = match unless_served(open_journal(&config))? {
                Some(j) => {
                    let current = configured_mapping_version(&config, select.stale)?;
                    let filter = select.filter(&[], current.as_deref())?;
                    selection::rows(&select.select(&j, &filter)?)
                }
                None => block_on(remote::list(&config, &server, &select))?.messages,
            };
            let shown = rows.len();
            for row in rows {
                println!("{}", row.line());
            }
            if shown >= limit {
                eprintln!("(the first {shown} listed, oldest first; --limit N for more)");
            }
            Ok(ExitCode::SUCCESS)
        }
        JournalCommand::Show {
            common,
            id,
            payload,
            tenant,
            server,
        } => {
            let config = common.load()?;
            let id: MessageId = id.parse().context("message id must be a UUID")?;
            let (summary, raw) = match unless_served(open_journal(&config))? {
                Some(j) => {
                    let raw = match payload {
                        true => j.get(id)?.map(|r| r.envelope.payload),
                        false => None,
                    };
                    (selection::message_summary(&j, id, None)?, raw)
                }
                None => {
                    if payload {
                        anyhow::bail!("--payload reads the data directory itself, which the running server holds: stop it first (the admin API never serves message content)");
                    }
                    (
                        block_on(remote::message(&config, &server, tenant.as_deref(), id))?,
                        None,
                    )
                }
            };
            let Some(summary) = summary else {
                eprintln!("message {id} is not in the journal");
                return Ok(ExitCode::from(1));
            };
            println!("{}", serde_json::to_string_pretty(&summary)?);
            if let Some(raw) = raw {
                use std::io::Write;
                std::io::stdout().write_all(&raw)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        JournalCommand::Stats(common) => {
            let config = common.load()?;
            let j = open_journal(&config)?;
            let s = j.stats();
            println!(
                "head_seq={} approx_messages={}",
                s.head_seq, s.approx_messages
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let config = args.common.load()?;
    let mut select = args.select;
    if args.failed {
        select.state = Some("failed".into());
    }
    if select.is_unbounded() {
        eprintln!(
            "nothing to replay: give message ids, --failed or another criterion (see --help)"
        );
        return Ok(ExitCode::from(1));
    }
    let report = match unless_served(open_journal(&config))? {
        Some(j) => {
            let current = configured_mapping_version(&config, select.stale)?;
            let filter = select.replay_filter(current.as_deref())?;
            let selected = select.select_for_replay(&j, &filter)?;
            let report = block_on(selection::replay(&j, selected, args.dry_run))?;
            if report.queued > 0 {
                eprintln!("no server is running on this data directory: `tributary serve` maps them when it starts");
            }
            report
        }
        None => block_on(remote::replay(&config, &args.server, &select, args.dry_run))?,
    };
    report.print(args.dry_run);
    // Nothing selected is most often a mistyped selection; a script should see it (a dry run
    // is the way to ask whether anything matches, and answers 0 with success).
    Ok(if report.matched == 0 && !args.dry_run {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn backup(args: BackupArgs) -> anyhow::Result<ExitCode> {
    let config = args.common.load()?;
    let report = match unless_served(open_db(&config))? {
        Some(db) => {
            let Some(to) = &args.to else {
                anyhow::bail!(
                    "no server runs on {}: give the new directory with --to DIR",
                    config.data_dir.display()
                );
            };
            db.backup(to).with_context(|| {
                format!(
                    "backing up {} to {}",
                    config.data_dir.display(),
                    to.display()
                )
            })?
        }
        None => {
            if let Some(to) = &args.to {
                anyhow::bail!(
                    "a server runs on {}: it writes backups under backup.dir, not to {} (drop --to)",
                    config.data_dir.display(),
                    to.display()
                );
            }
            block_on(remote::backup(&config, &args.server))?
        }
    };
    println!(
        "backup {}: {} store entries, {} audit files, {} other files, {} bytes, {} ms",
        report.path.display(),
        report.store_entries,
        report.audit_files,
        report.other_files,
        report.bytes,
        report.millis
    );
    Ok(ExitCode::SUCCESS)
}

/// What was opened from the data directory, or `None` when a running server holds it: the
/// command then asks that server instead.
pub fn unless_served<T>(opened: anyhow::Result<T>) -> anyhow::Result<Option<T>> {
    match opened {
        Ok(v) => Ok(Some(v)),
        Err(e)
            if e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<tributary_storage::StorageError>(),
                    Some(tributary_storage::StorageError::InUse(_))
                )
            }) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The configured mapping set's version, which `--stale` compares with (read only when asked).
fn configured_mapping_version(config: &Config, stale: bool) -> anyhow::Result<Option<String>> {
    if !stale {
        return Ok(None);
    }
    let dir = config.mapping.hl7v2_dir();
    let version = tributary_mapping::MappingSet::version_of(&dir).map_err(|e| {
        anyhow::anyhow!("--stale: mapping set {} does not load:\n{e}", dir.display())
    })?;
    Ok(Some(version))
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime starts")
        .block_on(f)
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_check_redacts_secrets_but_not_where_they_are_kept() {
        let mut v: toml::Value = toml::from_str(
            r#"
            [amqp]
            url = "amqp://guest:s3cret@rabbit:5672/%2f"
            [kafka]
            sasl_password = "pw"
            sasl_username = "svc"
            [facade.auth]
            introspection_secret_file = "/run/secrets/introspection"
            [[subscriptions.inbound]]
            token = "partner-token"
            token_url = "https://ehr.example/token"
            client_secret = "cs"
            base_url = "https://ehr.example/fhir"
            "#,
        )
        .unwrap();
        super::redact_secrets(&mut v);
        let text = toml::to_string(&v).unwrap();
        for secret in ["s3cret", "\"pw\"", "partner-token", "\"cs\""] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        for kept in [
            "amqp://guest:<redacted>@rabbit:5672/%2f",
            "svc",
            "/run/secrets/introspection",
            "https://ehr.example/fhir",
            "https://ehr.example/token",
        ] {
            assert!(text.contains(kept), "{kept} not in {text}");
        }
    }
}
