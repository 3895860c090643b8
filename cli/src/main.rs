//! `pg_hardstorage`: the command-line face of the library. Every command
//! calls the same library function the REST API calls, and prints the same
//! body under `-o json`.

mod commands;
mod output;
mod progress;
mod serve;
mod signals;

use clap::{Args, Parser, Subcommand};
use output::{Format, Out};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "pg_hardstorage",
    version,
    about = "Fast, verifying PostgreSQL backups"
)]
pub struct Cli {
    /// Repository: /path, file:///path, s3://bucket/prefix or memory://
    #[arg(long, global = true, env = "PG_HARDSTORAGE_REPO")]
    pub repo: Option<String>,
    /// JSON file with defaults: {"repo": "...", "key_file": "..."}
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Output format (table on a terminal, json otherwise)
    #[arg(short = 'o', long = "output", global = true, value_enum)]
    pub output: Option<Format>,
    /// Print nothing but errors
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Key file holding the repository KEK (instead of PG_HARDSTORAGE_PASSPHRASE)
    #[arg(long, global = true)]
    pub key_file: Option<PathBuf>,
    /// File holding the repository passphrase (for restore_command, services)
    #[arg(long, global = true, env = "PG_HARDSTORAGE_PASSPHRASE_FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// POST every event of the command to this URL (repeatable; also
    /// `webhooks` in --config). `serve` posts every operation's events.
    #[arg(long, global = true)]
    pub webhook: Vec<String>,
    /// External KMS program that wraps/unwraps the master key
    /// (`CMD wrap` / `CMD unwrap`, stdin to stdout)
    #[arg(long, global = true, env = "PG_HARDSTORAGE_KMS_COMMAND")]
    pub kms_command: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create and inspect repositories
    #[command(subcommand)]
    Repo(RepoCmd),
    /// Named backup sources
    #[command(subcommand)]
    Deployment(DeploymentCmd),
    /// Take, list, show and verify backups
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Restore a backup into a directory
    Restore(RestoreArgs),
    /// WAL archiving (PostgreSQL deployments)
    #[command(subcommand)]
    Wal(WalCmd),
    /// Key management
    #[command(subcommand)]
    Kms(KmsCmd),
    /// The audit log: an append-only hash chain of every mutating operation
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Health report: repository, keys, slots, WAL gaps, backup age, space
    Doctor {
        deployment: Option<String>,
        /// The newest backup may be at most this old (e.g. 26h, 7d)
        #[arg(long, default_value = "26h")]
        max_age: String,
        /// Largest WAL a slot may hold back, in bytes (e.g. 1G)
        #[arg(long, default_value = "1G")]
        max_slot_lag: String,
    },
    /// Agents registered in this repository (servers, WAL streamers)
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Search backups across deployments: deployment:D status:live|deleted|any
    /// held:true|false since:WHEN until:WHEN kind:K, and words of the id
    Search { query: Vec<String> },
    /// API bearer tokens (stored hashed; shown once)
    #[command(subcommand)]
    Token(TokenCmd),
    /// Run the REST API server
    Serve(ServeArgs),
    /// Measure pipeline throughput and name the bottleneck stage
    Bench(BenchArgs),
    /// Print shell completions
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
pub enum AgentCmd {
    /// Every agent with its state (online, offline, stopped)
    List,
}

#[derive(Subcommand, Debug)]
pub enum KmsCmd {
    /// The keyring: which KEKs wrap the master key (never key material)
    Inspect,
    /// Wrap the master key under a new KEK and retire the old one (no data
    /// is rewritten)
    Rotate {
        #[arg(long, group = "new")]
        new_key_file: Option<PathBuf>,
        #[arg(long, group = "new")]
        new_passphrase_file: Option<PathBuf>,
        /// External program called as `CMD wrap` / `CMD unwrap`
        #[arg(long, group = "new")]
        new_kms_command: Option<String>,
    },
    /// Destroy every key envelope: all data in the repository becomes
    /// unrecoverable
    Shred {
        /// The repository id (`repo show`), to confirm
        #[arg(long)]
        confirm: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Events, oldest first, filtered
    Search {
        /// RFC 3339 or relative ("2 hours ago")
        #[arg(long)]
        since: Option<String>,
        /// e.g. backup.take, backup.delete, token.create
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        deployment: Option<String>,
    },
    /// Walk the chain; names the first record that was edited, removed or reordered
    VerifyChain,
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token scoped to RBAC verbs (and a tenant); prints it once
    Create {
        /// Comma-separated: backup:create, backup:read, restore:execute,
        /// kms:rotate, kms:shred, audit:read, admin:*
        #[arg(long, value_delimiter = ',', required = true)]
        verbs: Vec<String>,
        /// Restrict the token to one tenant's deployments
        #[arg(long)]
        tenant: Option<String>,
        /// Token name (also the CN a client certificate maps to)
        #[arg(long)]
        name: Option<String>,
    },
    List,
    Revoke {
        name: String,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free one)
    #[arg(long, default_value = "127.0.0.1:8432")]
    pub listen: String,
    /// PEM certificate chain for TLS
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA whose client certificates are accepted (mutual TLS)
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Stream this deployment's WAL while serving (repeatable); its lag
    /// shows in /metrics
    #[arg(long, value_name = "DEPLOYMENT")]
    pub wal_stream: Vec<String>,
    /// Directory whose key and passphrase files POST /v1/kms/rotate may
    /// name (without it, rotation over the API is refused)
    #[arg(long)]
    pub kms_dir: Option<PathBuf>,
    /// Events each webhook may have queued before it drops (and counts) more
    #[arg(long, default_value_t = 1024)]
    pub webhook_queue: usize,
    /// Seconds running streams get to finish after SIGTERM
    #[arg(long, default_value_t = 60)]
    pub shutdown_grace: u64,
    /// Largest request body accepted, in bytes
    #[arg(long, default_value_t = 1 << 20)]
    pub body_limit: usize,
    /// Connections served at once; one more is answered 503 and closed
    /// (default: half the descriptors the process may open, 16..4096)
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub max_connections: usize,
    /// Operations (backups, restores, verifies, ...) run at once for API
    /// callers; one more is answered 503 (default: two per core, at least 4)
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub max_operations: usize,
}

#[derive(Subcommand, Debug)]
pub enum RepoCmd {
    /// Initialise a new repository
    Init {
        #[arg(long, default_value = "aes-256-gcm", value_parser = ["aes-256-gcm", "none"])]
        encryption: String,
        /// zstd, zstd:LEVEL or none
        #[arg(long, default_value = "zstd:1")]
        compression: String,
        /// MIN,AVG,MAX chunk sizes in bytes
        #[arg(long)]
        chunk_size: Option<String>,
        /// Target pack size in bytes
        #[arg(long)]
        pack_size: Option<u64>,
    },
    /// Show the repository configuration and deployments
    Show,
    /// Config, keys, every signature, every referenced pack, the index
    Check,
    /// Bytes by category: packs, index, manifests, WAL, metadata, garbage
    Usage,
    /// Mark and sweep unreferenced packs (dry-run unless --apply)
    Gc {
        #[arg(long)]
        apply: bool,
        /// Packs younger than this are kept (e.g. 6h, 30m, 0s)
        #[arg(long, default_value = "6h")]
        grace: String,
    },
    /// Read every pack back through the verifying path; --apply quarantines bad ones
    Scrub {
        #[arg(long)]
        apply: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum WalCmd {
    /// Stream WAL from the deployment's replication slot (runs until stopped)
    Stream { deployment: String },
    /// Archived segments and gaps
    List { deployment: String },
    /// The restore_command shim: exit 1 when the segment is not archived,
    /// 255 on any other failure (which stops recovery)
    Fetch {
        deployment: String,
        segment: String,
        dest: PathBuf,
        /// A restore's WAL spool: after delivering SEGMENT, fill it with
        /// the next --prefetch segments in the background
        #[arg(long, requires = "prefetch")]
        spool: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        prefetch: usize,
        /// Only fill the spool (the background half of --spool)
        #[arg(long, hide = true, requires = "spool")]
        fill_spool: bool,
    },
    /// Recreate the slot and record the gap
    Repair { deployment: String },
}

#[derive(Subcommand, Debug)]
pub enum DeploymentCmd {
    /// Create a deployment (idempotent on NAME)
    Create {
        name: String,
        #[arg(long, conflicts_with = "path", required_unless_present = "path")]
        pg: Option<String>,
        #[arg(long, requires = "pg")]
        pgdata: Option<PathBuf>,
        #[arg(long)]
        path: Option<PathBuf>,
    },
    List,
    Show {
        name: String,
    },
    /// Change a deployment's connection string, data directory or path
    Update {
        name: String,
        #[arg(long)]
        pg: Option<String>,
        #[arg(long)]
        pgdata: Option<PathBuf>,
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Remove a deployment (its backups are kept)
    Delete {
        name: String,
    },
}

#[derive(Args, Debug, Clone)]
pub struct PipelineArgs {
    /// Worker threads (default: one per core)
    #[arg(long)]
    pub workers: Option<usize>,
    /// Byte budget of each pipeline edge
    #[arg(long)]
    pub queue_bytes: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Take a backup of a deployment
    Run {
        deployment: String,
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// PostgreSQL 17+: read every file, not only the blocks the server's
        /// WAL summaries say changed since the previous backup
        #[arg(long)]
        full: bool,
    },
    List {
        deployment: Option<String>,
    },
    Show {
        id: String,
    },
    Verify {
        id: String,
    },
    /// Soft-delete: hidden from lists and restores, data kept until GC;
    /// refused while a legal hold is active
    Delete {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Place a legal hold: deletion is refused until it is released (or,
    /// with --until, until then); never removed automatically
    Hold {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        /// RFC 3339 expiry of the hold's protection
        #[arg(long)]
        until: Option<String>,
    },
    /// Release a legal hold
    Release {
        id: String,
    },
    /// Apply a retention policy: deletes (soft) what it does not keep; the
    /// newest backup and held ones are always kept (dry-run unless --apply)
    Prune {
        deployment: String,
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
        #[arg(long, default_value_t = 0)]
        keep_daily: usize,
        #[arg(long, default_value_t = 0)]
        keep_weekly: usize,
        #[arg(long, default_value_t = 0)]
        keep_monthly: usize,
        #[arg(long)]
        apply: bool,
    },
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    pub deployment: String,
    /// Backup id or `latest`
    #[arg(long, required_unless_present = "status")]
    pub backup: Option<String>,
    #[arg(long, required_unless_present = "status")]
    pub target: Option<PathBuf>,
    /// Show the record of an earlier restore instead (its restore_id)
    #[arg(long, conflicts_with_all = ["backup", "target"])]
    pub status: Option<String>,
    #[arg(long)]
    pub to: Option<String>,
    #[arg(long)]
    pub to_lsn: Option<String>,
    #[arg(long)]
    pub to_name: Option<String>,
    #[arg(long, default_value = "auto", value_parser = ["auto", "skip", "require"])]
    pub verify: String,
    /// Write into a non-empty target
    #[arg(long)]
    pub force: bool,
    /// Into an existing data directory of the same cluster: write only the
    /// files and pages that differ, remove what the backup does not have
    #[arg(long)]
    pub delta: bool,
    /// Start the restored cluster as a standby (writes standby.signal);
    /// re-seed a replica with --delta --standby
    #[arg(long)]
    pub standby: bool,
    /// With --standby: the primary_conninfo to follow (else the backup's)
    #[arg(long, requires = "standby")]
    pub primary_conninfo: Option<String>,
    /// WAL segments staged into the target and kept staged ahead of replay
    /// when PostgreSQL can read key material (0: stage all it may need)
    #[arg(long, default_value_t = pg_hardstorage_repo::restore::DEFAULT_PREFETCH)]
    pub wal_prefetch: usize,
    /// Restore the tablespace at OLD location into NEW (repeatable)
    #[arg(long, value_name = "OLD=NEW")]
    pub tablespace_mapping: Vec<String>,
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Bytes of generated input (e.g. 2G, 512M)
    #[arg(long, default_value = "1G")]
    pub size: String,
    /// 0 = random, 1 = highly compressible text
    #[arg(long, default_value_t = 0.5)]
    pub compressibility: f64,
    /// Read this directory instead of generating data
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Bytes per generated file
    #[arg(long, default_value = "64M")]
    pub file_size: String,
    /// Bytes each single-core stage rate is measured on
    #[arg(long, default_value = "128M")]
    pub sample: String,
    #[arg(long, default_value_t = 1)]
    pub zstd_level: i32,
    /// Measure restore instead: back up the generated data into memory,
    /// restore it into --restore-dir, report GB/s and efficiency
    #[arg(long)]
    pub restore: bool,
    /// Where `--restore` writes (a scratch directory; emptied afterwards)
    #[arg(long, default_value_os_t = std::env::temp_dir().join("pg_hardstorage-bench-restore"))]
    pub restore_dir: PathBuf,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

/// glibc hands every buffer over 128 KiB straight back to the kernel and
/// pays page faults to get it again; the pipeline recycles multi-MiB blocks
/// all the time. Keeping them in the heap measured faster (ARCHITECTURE.md,
/// "Allocator").
fn tune_allocator() {
    // SAFETY: mallopt only adjusts glibc's allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    let mut out = Out::new(cli.output, cli.quiet);
    // `serve` gives its webhooks every operation's events itself.
    let hooks = match &cli.command {
        Command::Serve(_) => Vec::new(),
        _ => match commands::webhooks(&cli) {
            Ok(h) => h,
            Err(p) => {
                out.failure(&p);
                std::process::exit(p.exit_code());
            }
        },
    };
    for h in &hooks {
        out.bus.add_sink(h.sink());
    }
    let code = match commands::run(&cli, &mut out) {
        Ok(()) => 0,
        Err(p) => {
            out.failure(&p);
            match &cli.command {
                // restore_command semantics: "not archived" is 1 (end of
                // archive); anything else must stop recovery (status > 125).
                Command::Wal(WalCmd::Fetch { .. }) if p.code == "wal.segment_not_found" => 1,
                Command::Wal(WalCmd::Fetch { .. }) => 255,
                _ => p.exit_code(),
            }
        }
    };
    // The process is about to end: give webhooks a moment to deliver.
    out.bus.close();
    for h in &hooks {
        h.drain(std::time::Duration::from_secs(5));
    }
    std::process::exit(code);
}
