//! One function per command; each returns the JSON body the API returns.

use crate::output::{bytes, Out};
use crate::{
    AgentCmd, AuditCmd, BackupCmd, BenchArgs, Cli, Command, DeploymentCmd, KmsCmd, PipelineArgs,
    RepoCmd, RestoreArgs, TokenCmd, WalCmd,
};
use clap::CommandFactory;
use pg_hardstorage_engine::format::ChunkerParams;
use pg_hardstorage_engine::pipeline::PipelineConfig;
use pg_hardstorage_engine::store::{DynStore, OutageWhile, Throttled};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use pg_hardstorage_repo::backup::BackupOptions;
use pg_hardstorage_repo::deployment::{self, Deployment, Kind};
use pg_hardstorage_repo::{bench, catalog, ops, restore, InitOptions, KeySource, Repository};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

type R = Result<(), Problem>;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    repo: Option<String>,
    key_file: Option<std::path::PathBuf>,
    #[serde(default)]
    webhooks: Vec<String>,
}

/// The webhooks of `--webhook` and the config file, started.
pub fn webhooks(cli: &Cli) -> Result<Vec<pg_hardstorage_apiserver::webhook::Webhook>, Problem> {
    let mut urls = cli.webhook.clone();
    urls.extend(config(cli)?.webhooks);
    let queue = match &cli.command {
        Command::Serve(a) => a.webhook_queue,
        _ => 1024,
    };
    pg_hardstorage_apiserver::webhook::parse_all(&urls, queue)
}

fn config(cli: &Cli) -> Result<ConfigFile, Problem> {
    let Some(path) = &cli.config else {
        return Ok(ConfigFile::default());
    };
    let raw = std::fs::read(path).map_err(|e| {
        Problem::io(
            Code::UsageInvalidArgument,
            format!("--config {}", path.display()),
            &e,
        )
    })?;
    serde_json::from_slice(&raw).map_err(|e| {
        Problem::new(
            Code::UsageInvalidArgument,
            format!("--config {}: {e}", path.display()),
        )
    })
}

fn store(cli: &Cli, create: bool) -> Result<DynStore, Problem> {
    let cfg = config(cli)?;
    let url = cli.repo.clone().or(cfg.repo).ok_or_else(|| {
        Problem::new(Code::UsageInvalidArgument, "no repository given").suggest(
            "Pass --repo or set PG_HARDSTORAGE_REPO",
            Some("export PG_HARDSTORAGE_REPO=/var/lib/pg_hardstorage".into()),
        )
    })?;
    let mut s = phs_store::open_store(&url, create)?;
    // Rehearsal knobs: an outage while a flag file exists, slow storage.
    if let Ok(flag) = std::env::var("PG_HARDSTORAGE_FAULT_OUTAGE_WHILE") {
        s = Arc::new(OutageWhile {
            inner: s,
            flag: flag.into(),
        });
    }
    match std::env::var("PG_HARDSTORAGE_FAULT_PUT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(ms) => Ok(Arc::new(Throttled {
            inner: s,
            put_delay: Duration::from_millis(ms),
        })),
        None => Ok(s),
    }
}

fn key_source(cli: &Cli) -> Result<KeySource, Problem> {
    let cfg = config(cli)?;
    KeySource::from_env_or_command(
        cli.key_file.clone().or(cfg.key_file),
        cli.passphrase_file.clone(),
        cli.kms_command.clone(),
    )
}

pub fn open(cli: &Cli) -> Result<Repository, Problem> {
    Repository::open(store(cli, false)?, &key_source(cli)?)
}

fn pipeline_cfg(p: &PipelineArgs) -> PipelineConfig {
    let mut c = PipelineConfig::default();
    if let Some(w) = p.workers {
        c.workers = w.max(1);
    }
    if let Some(q) = p.queue_bytes {
        c.queue_bytes = q.max(1 << 20);
    }
    if let Some(ms) = std::env::var("PG_HARDSTORAGE_PROGRESS_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        c.progress_every = Duration::from_millis(ms);
    }
    c
}

pub fn run(cli: &Cli, out: &mut Out) -> R {
    match &cli.command {
        Command::Repo(c) => repo(cli, out, c),
        Command::Deployment(c) => deployment_cmd(cli, out, c),
        Command::Backup(c) => backup(cli, out, c),
        Command::Restore(a) => restore_cmd(cli, out, a),
        Command::Bench(a) => bench_cmd(out, a),
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "pg_hardstorage",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Wal(c) => wal_cmd(cli, out, c),
        Command::Kms(c) => kms_cmd(cli, out, c),
        Command::Agent(AgentCmd::List) => {
            let r = open(cli)?;
            let body = ops::agents_list(&r)?;
            out.success("agents.list", body, |b| {
                let mut s = String::new();
                for a in b.as_array().cloned().unwrap_or_default() {
                    let _ = writeln!(
                        s,
                        "{:<18} {:<8} {:<11} {:<20} {}",
                        a["agent_id"].as_str().unwrap_or(""),
                        a["state"].as_str().unwrap_or(""),
                        a["role"].as_str().unwrap_or(""),
                        a["host"].as_str().unwrap_or(""),
                        a["last_seen"].as_str().unwrap_or("")
                    );
                }
                s
            });
            Ok(())
        }
        Command::Search { query } => {
            let r = open(cli)?;
            let body = ops::search(&r, &query.join(" "), None)?;
            out.success("search", body, backups_table);
            Ok(())
        }
        Command::Audit(c) => audit_cmd(cli, out, c),
        Command::Doctor {
            deployment,
            max_age,
            max_slot_lag,
        } => {
            let r = open(cli)?;
            let opts = pg_hardstorage_repo::doctor::DoctorOptions {
                max_backup_age: Duration::from_secs(parse_duration(max_age)?),
                max_slot_lag_bytes: parse_size(max_slot_lag)?,
                ..Default::default()
            };
            let body = ops::doctor(&r, deployment.as_deref(), &opts)?;
            out.success(
                if deployment.is_some() {
                    "doctor.deployment"
                } else {
                    "doctor.report"
                },
                body,
                |b| {
                    format!(
                        "healthy: {} deployment(s) checked, pg_hardstorage {}\n",
                        b["deployments"].as_array().map_or(0, |a| a.len()),
                        b["version"].as_str().unwrap_or("")
                    )
                },
            );
            Ok(())
        }
        Command::Token(c) => token_cmd(cli, out, c),
        Command::Serve(a) => crate::serve::serve(cli, out, a),
    }
}

/// `6h`, `30m`, `45s`, `2d` or plain seconds.
fn parse_duration(s: &str) -> Result<u64, Problem> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().map_err(|_| {
        Problem::new(
            Code::UsageInvalidArgument,
            format!("duration {s:?}: want e.g. 6h, 30m, 0s"),
        )
    })?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(Problem::new(
                Code::UsageInvalidArgument,
                format!("duration {s:?}: unit must be s, m, h or d"),
            ))
        }
    };
    Ok(n * mult)
}

fn parse_size(s: &str) -> Result<u64, Problem> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match t[i..].to_ascii_uppercase().as_str() {
                "K" | "KB" | "KIB" => 1u64 << 10,
                "M" | "MB" | "MIB" => 1 << 20,
                "G" | "GB" | "GIB" => 1 << 30,
                "T" | "TB" | "TIB" => 1 << 40,
                "B" => 1,
                _ => {
                    return Err(Problem::new(
                        Code::UsageInvalidArgument,
                        format!("bad size {s:?}"),
                    ))
                }
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|n| *n >= 0.0)
        .map(|n| (n * mult as f64) as u64)
        .ok_or_else(|| {
            Problem::new(
                Code::UsageInvalidArgument,
                format!("bad size {s:?} (e.g. 2G, 512M, 1048576)"),
            )
        })
}

fn repo(cli: &Cli, out: &mut Out, c: &RepoCmd) -> R {
    match c {
        RepoCmd::Init {
            encryption,
            compression,
            chunk_size,
            pack_size,
        } => {
            let zstd_level = match compression.as_str() {
                "none" => None,
                "zstd" => Some(1),
                other => match other
                    .strip_prefix("zstd:")
                    .and_then(|l| l.parse::<i32>().ok())
                {
                    Some(l) if (1..=22).contains(&l) => Some(l),
                    _ => {
                        return Err(Problem::new(
                            Code::UsageInvalidArgument,
                            format!("--compression {other:?}: use zstd, zstd:LEVEL (1-22) or none"),
                        ))
                    }
                },
            };
            let mut chunker = ChunkerParams::default();
            if let Some(cs) = chunk_size {
                let v: Vec<u32> = cs
                    .split(',')
                    .filter_map(|x| parse_size(x).ok())
                    .map(|x| x as u32)
                    .collect();
                let [min, avg, max] = v.as_slice() else {
                    return Err(Problem::new(
                        Code::UsageInvalidArgument,
                        format!("--chunk-size {cs:?}: want MIN,AVG,MAX"),
                    ));
                };
                chunker.min_size = *min;
                chunker.avg_size = *avg;
                chunker.max_size = *max;
            }
            let mut opts = InitOptions {
                encryption: encryption == "aes-256-gcm",
                zstd_level,
                chunker,
                ..Default::default()
            };
            if let Some(p) = pack_size {
                opts.pack_target_bytes = (*p).clamp(1 << 16, 1 << 30);
            }
            let r = Repository::init(store(cli, true)?, &key_source(cli)?, opts)?;
            let body =
                json!({"repo": r.store.describe(), "config": r.config, "key_id": r.keys.key_id});
            out.success("repo.init", body, |b| {
                format!(
                    "initialised repository {} (key {})\n",
                    b["repo"].as_str().unwrap_or(""),
                    b["key_id"].as_str().unwrap_or("")
                )
            });
            Ok(())
        }
        RepoCmd::Show => {
            let r = open(cli)?;
            let body = ops::repos_show(&r)?;
            out.success("repos.show", body, |b| {
                format!(
                    "repository {}\nformat v{}  encryption {}  compression {}\ndeployments: {}  tenants: {}\n",
                    b["repo"].as_str().unwrap_or(""),
                    b["config"]["format_version"],
                    b["config"]["encryption"].as_str().unwrap_or(""),
                    b["config"]["compression"]["algorithm"]
                        .as_str()
                        .unwrap_or(""),
                    b["deployments"].as_array().map_or(0, |a| a.len()),
                    b["tenants"].as_array().map_or(0, |a| a.len())
                )
            });
            Ok(())
        }
        RepoCmd::Check => {
            let r = open(cli)?;
            let body = ops::repos_check(&r)?;
            out.success("repos.check", body, |b| {
                format!(
                    "repository healthy: {} manifests, {} WAL records, {} packs, {} warning(s)\n",
                    b["manifests"],
                    b["wal_records"],
                    b["packs"],
                    b["findings"].as_array().map_or(0, |a| a.len())
                )
            });
            Ok(())
        }
        RepoCmd::Usage => {
            let r = open(cli)?;
            let body = ops::repos_usage(&r)?;
            out.success("repos.usage", body, |b| {
                let mut s = String::new();
                for k in [
                    "data_packs",
                    "index",
                    "manifests",
                    "wal_records",
                    "metadata",
                    "garbage",
                    "total",
                ] {
                    let _ = writeln!(s, "{k:<12} {:>12}", bytes(b[k].as_u64().unwrap_or(0)));
                }
                s
            });
            Ok(())
        }
        RepoCmd::Gc { apply, grace } => {
            let r = open(cli)?;
            let opts = pg_hardstorage_repo::gc::GcOptions {
                apply: *apply,
                grace: Duration::from_secs(parse_duration(grace)?),
                ..Default::default()
            };
            out.stream_events();
            let body = ops::repos_gc(&r, &cli_actor(), &opts, &out.bus)?;
            out.success("repos.gc", body, |b| {
                format!(
                    "{} {} unreferenced packs ({}); {} kept inside the grace period\n",
                    if b["applied"] == true {
                        "removed"
                    } else {
                        "would remove"
                    },
                    b["packs_garbage"],
                    bytes(b["bytes_garbage"].as_u64().unwrap_or(0)),
                    b["packs_young"]
                )
            });
            Ok(())
        }
        RepoCmd::Scrub { apply } => {
            let r = open(cli)?;
            out.stream_events();
            let threads = pg_hardstorage_engine::pipeline::default_workers();
            let body = ops::repos_scrub(&r, &cli_actor(), *apply, &out.bus, threads)?;
            out.success("repos.scrub", body, |b| {
                format!(
                    "scrubbed {} packs, {} chunks, {}: all good\n",
                    b["packs"],
                    b["chunks"],
                    bytes(b["bytes"].as_u64().unwrap_or(0))
                )
            });
            Ok(())
        }
    }
}

fn deployment_table(b: &Value) -> String {
    let mut s = String::new();
    let list = b.as_array().cloned().unwrap_or_else(|| vec![b.clone()]);
    let _ = writeln!(s, "{:<24} {:<9} SOURCE", "NAME", "KIND");
    for d in list {
        let src = d["path"].as_str().or(d["pg"].as_str()).unwrap_or("");
        let _ = writeln!(
            s,
            "{:<24} {:<9} {src}",
            d["name"].as_str().unwrap_or(""),
            d["kind"].as_str().unwrap_or("")
        );
    }
    s
}

fn deployment_cmd(cli: &Cli, out: &mut Out, c: &DeploymentCmd) -> R {
    let r = open(cli)?;
    match c {
        DeploymentCmd::Create {
            name,
            pg,
            pgdata,
            path,
        } => {
            let d = Deployment {
                name: name.clone(),
                kind: if path.is_some() {
                    Kind::Path
                } else {
                    Kind::Postgres
                },
                path: path.as_ref().map(|p| p.display().to_string()),
                pg: pg.clone(),
                pgdata: pgdata.as_ref().map(|p| p.display().to_string()),
                created_at: pg_hardstorage_engine::event::now_rfc3339(),
                system_identifier: None,
                tenant: None,
            };
            let body = ops::deployments_create(&r, &cli_actor(), d)?;
            out.success("deployments.create", body, deployment_table);
        }
        DeploymentCmd::List => {
            let body = ops::deployments_list(&r, None)?;
            out.success("deployments.list", body, deployment_table);
        }
        DeploymentCmd::Show { name } => {
            let body = ops::deployments_show(&r, name)?;
            out.success("deployments.show", body, deployment_table);
        }
        DeploymentCmd::Update {
            name,
            pg,
            pgdata,
            path,
        } => {
            let body = ops::deployments_update(
                &r,
                &cli_actor(),
                name,
                pg.clone(),
                pgdata.as_ref().map(|p| p.display().to_string()),
                path.as_ref().map(|p| p.display().to_string()),
            )?;
            out.success("deployments.update", body, deployment_table);
        }
        DeploymentCmd::Delete { name } => {
            let body = ops::deployments_delete(&r, &cli_actor(), name)?;
            out.success("deployments.delete", body, |_| {
                format!("deleted deployment {name} (backups kept)\n")
            });
        }
    }
    Ok(())
}

fn backups_table(b: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<44} {:>8} {:>11} {:>11}  FINISHED",
        "BACKUP", "FILES", "LOGICAL", "ADDED"
    );
    for x in b.as_array().cloned().unwrap_or_default() {
        let _ = writeln!(
            s,
            "{:<44} {:>8} {:>11} {:>11}  {}",
            x["backup_id"].as_str().unwrap_or(""),
            x["files"],
            bytes(x["bytes_logical"].as_u64().unwrap_or(0)),
            bytes(x["bytes_added"].as_u64().unwrap_or(0)),
            x["finished_at"].as_str().unwrap_or("")
        );
    }
    s
}

fn backup(cli: &Cli, out: &mut Out, c: &BackupCmd) -> R {
    match c {
        BackupCmd::Run {
            deployment,
            pipeline,
            full,
        } => {
            let r = open(cli)?;
            deployment::get(&r, deployment)?;
            out.stream_events();
            let opts = BackupOptions {
                pipeline: pipeline_cfg(pipeline),
                read_backend: None,
                full: *full,
            };
            let body = ops::backups_take(&r, &cli_actor(), deployment, &out.bus, &opts)?;
            out.success("backups.take", body, |b| {
                format!(
                    "backup {} done: {} files, {} read, {} added\n",
                    b["backup_id"].as_str().unwrap_or(""),
                    b["files"],
                    bytes(b["bytes_logical"].as_u64().unwrap_or(0)),
                    bytes(b["bytes_added"].as_u64().unwrap_or(0))
                )
            });
        }
        BackupCmd::List { deployment } => {
            let r = open(cli)?;
            let body = ops::backups_list(&r, deployment.as_deref())?;
            out.success("backups.list", body, backups_table);
        }
        BackupCmd::Show { id } => {
            let r = open(cli)?;
            let body = ops::backups_show(&r, id)?;
            out.success("backups.show", body, |b| {
                format!(
                    "backup {}\ndeployment {}\nstarted {}  finished {}\nfiles {}  bytes {}  added {}\n",
                    b["backup_id"].as_str().unwrap_or(""),
                    b["deployment"].as_str().unwrap_or(""),
                    b["started_at"].as_str().unwrap_or(""),
                    b["finished_at"].as_str().unwrap_or(""),
                    b["stats"]["files"],
                    bytes(b["stats"]["bytes_logical"].as_u64().unwrap_or(0)),
                    bytes(b["stats"]["bytes_added"].as_u64().unwrap_or(0)),
                )
            });
        }
        BackupCmd::Verify { id } => {
            let r = open(cli)?;
            catalog::load(&r, id)?;
            out.stream_events();
            let threads = pg_hardstorage_engine::pipeline::default_workers();
            let body = ops::backups_verify(&r, id, &out.bus, threads)?;
            out.success("backups.verify", body, |b| {
                format!(
                    "backup {} verified: {} chunks in {} packs, {}\n",
                    b["backup_id"].as_str().unwrap_or(""),
                    b["chunks"],
                    b["packs"],
                    bytes(b["bytes"].as_u64().unwrap_or(0))
                )
            });
        }
        BackupCmd::Delete { id, reason } => {
            let r = open(cli)?;
            let body = ops::backups_delete(&r, id, &cli_actor(), reason.clone())?;
            out.success("backups.delete", body, |b| {
                format!(
                    "backup {} deleted (kept until garbage collection)\n",
                    b["backup_id"].as_str().unwrap_or("")
                )
            });
        }
        BackupCmd::Hold { id, reason, until } => {
            let r = open(cli)?;
            let body = ops::backups_hold(&r, id, &cli_actor(), reason.clone(), until.as_deref())?;
            out.success("backups.hold", body, |b| {
                format!("backup {} held\n", b["backup_id"].as_str().unwrap_or(""))
            });
        }
        BackupCmd::Prune {
            deployment,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            apply,
        } => {
            let r = open(cli)?;
            let policy = pg_hardstorage_repo::retention::Policy {
                keep_last: *keep_last,
                keep_daily: *keep_daily,
                keep_weekly: *keep_weekly,
                keep_monthly: *keep_monthly,
            };
            let report = pg_hardstorage_repo::retention::prune(
                &r,
                deployment,
                &policy,
                *apply,
                &cli_actor(),
            )?;
            let body = serde_json::to_value(report).unwrap_or_default();
            out.success("backups.prune", body, |b| {
                let mut s = String::new();
                for d in b["decisions"].as_array().cloned().unwrap_or_default() {
                    let _ = writeln!(
                        s,
                        "{:<6} {:<44} {}",
                        if d["keep"] == true {
                            "keep"
                        } else if b["applied"] == true {
                            "delete"
                        } else {
                            "would delete"
                        },
                        d["backup_id"].as_str().unwrap_or(""),
                        d["reasons"]
                            .as_array()
                            .map(|r| r
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(","))
                            .unwrap_or_default()
                    );
                }
                s
            });
        }
        BackupCmd::Release { id } => {
            let r = open(cli)?;
            let body = ops::backups_release(&r, &cli_actor(), id)?;
            out.success("backups.release", body, |b| {
                format!(
                    "backup {} released\n",
                    b["backup_id"].as_str().unwrap_or("")
                )
            });
        }
    }
    Ok(())
}

fn restore_cmd(cli: &Cli, out: &mut Out, a: &RestoreArgs) -> R {
    let r = open(cli)?;
    if let Some(id) = &a.status {
        let body = ops::restores_status(&r, &a.deployment, id)?;
        out.success("restores.status", body, |b| {
            format!(
                "restore {} of {}: {}\n",
                b["restore_id"].as_str().unwrap_or(""),
                b["backup_id"].as_str().unwrap_or(""),
                b["status"].as_str().unwrap_or("")
            )
        });
        return Ok(());
    }
    let req = ops::RestoreRequest {
        deployment: a.deployment.clone(),
        backup: a.backup.clone().unwrap_or_else(|| "latest".into()),
        // Relative to where the command runs; an empty one stays empty
        // (and is refused: a restore needs an absolute target).
        target: a
            .target
            .as_ref()
            .filter(|t| !t.as_os_str().is_empty())
            .map(|t| std::path::absolute(t).unwrap_or_else(|_| t.clone()))
            .unwrap_or_default(),
        to: a.to.clone(),
        to_lsn: a.to_lsn.clone(),
        to_name: a.to_name.clone(),
        verify: a.verify.clone(),
        force: a.force,
        threads: a
            .threads
            .unwrap_or_else(pg_hardstorage_engine::pipeline::default_workers),
        tablespace_mapping: a.tablespace_mapping.clone(),
        delta: a.delta,
        wal_prefetch: a.wal_prefetch,
        standby: a.standby.then(|| a.primary_conninfo.clone()),
    };
    let (m, opts) = ops::restore_plan(&r, &req, &|| restore_command(cli, &a.deployment), &out.bus)?;
    out.stream_events();
    let body = ops::restores_run(&r, &cli_actor(), &m, &opts, &out.bus)?;
    out.success("restores.initiate", body, |b| {
        format!(
            "restored {} into {}: {} files, {}\n",
            b["backup_id"].as_str().unwrap_or(""),
            b["target"].as_str().unwrap_or(""),
            b["files"],
            bytes(b["bytes"].as_u64().unwrap_or(0))
        )
    });
    Ok(())
}

fn bench_cmd(out: &mut Out, a: &BenchArgs) -> R {
    if !(0.0..=1.0).contains(&a.compressibility) {
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            "--compressibility must be within 0..1",
        ));
    }
    let opts = bench::BenchOptions {
        size: parse_size(&a.size)?,
        file_size: parse_size(&a.file_size)?.max(1),
        compressibility: a.compressibility,
        dir: a.dir.clone(),
        sample: parse_size(&a.sample)?.max(1 << 20),
        zstd_level: a.zstd_level,
        pipeline: pipeline_cfg(&a.pipeline),
    };
    if a.restore {
        if opts.dir.is_some() {
            return Err(Problem::new(
                Code::UsageInvalidArgument,
                "--restore measures generated data; --dir is for backup benches",
            ));
        }
        let report = pg_hardstorage_repo::bench_restore::run(&opts, &a.restore_dir, &out.bus)?;
        let body = serde_json::to_value(&report).unwrap_or_default();
        out.success("bench", body, |_| report.table());
        return Ok(());
    }
    let report = bench::run(&opts, &out.bus)?;
    let body = serde_json::to_value(&report).unwrap_or_default();
    out.success("bench", body, |_| report.table());
    Ok(())
}

/// After `wal fetch --spool` delivered `segment`: drops the spool's passed
/// segments and starts this command again, detached, with `--fill-spool`,
/// to fetch the next ones while replay runs. Advisory: a fill that cannot
/// start only means the next segment is fetched when asked for.
fn start_fill(spool: &std::path::Path, segment: &str) {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    if pg_hardstorage_repo::wal::parse_segment_name(segment).is_none() {
        return;
    }
    let _ = restore::spool::prune(spool, segment);
    let started = std::env::current_exe().and_then(|exe| {
        Command::new(exe)
            .args(std::env::args_os().skip(1))
            .arg("--fill-spool")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
    });
    if let Err(e) = started {
        eprintln!("pg_hardstorage: WAL prefetch not started: {e}");
    }
}

/// The command PostgreSQL runs for each WAL file: this binary, with key
/// material the server's user can read.
fn restore_command(cli: &Cli, deployment: &str) -> Result<String, Problem> {
    Ok(format!("{} {deployment} %f %p", restore_command_base(cli)?))
}

/// `restore_command` up to the deployment name: this binary's `wal fetch`
/// with the repository and key material PostgreSQL's user can read.
pub fn restore_command_base(cli: &Cli) -> Result<String, Problem> {
    let exe =
        std::env::current_exe().map_err(|e| Problem::internal(format!("current_exe: {e}")))?;
    let cfg = config(cli)?;
    let repo = cli.repo.clone().or(cfg.repo).unwrap_or_default();
    let abs = |p: &std::path::Path| {
        std::path::absolute(p)
            .map(|a| a.display().to_string())
            .unwrap_or_default()
    };
    let word = pg_hardstorage_repo::restore::command_word;
    let key = if let Some(k) = cli.key_file.clone().or(cfg.key_file) {
        format!("--key-file {}", word(&abs(&k)))
    } else if let Some(p) = &cli.passphrase_file {
        format!("--passphrase-file {}", word(&abs(p)))
    } else {
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            "archive recovery needs key material PostgreSQL can read: pass --key-file or --passphrase-file",
        )
        .suggest("Put the passphrase in a file readable by the postgres user and pass --passphrase-file", None));
    };
    Ok(format!(
        "{} --repo {} {key} -q wal fetch",
        word(&exe.display().to_string()),
        word(&repo)
    ))
}

fn kms_cmd(cli: &Cli, out: &mut Out, c: &KmsCmd) -> R {
    let r = open(cli)?;
    match c {
        KmsCmd::Inspect => {
            let body = ops::kms_inspect(&r)?;
            out.success("kms.inspect", body, |b| {
                let mut s = format!("master key {}\n", b["master_key_id"].as_str().unwrap_or(""));
                for k in b["keks"].as_array().cloned().unwrap_or_default() {
                    let _ = writeln!(
                        s,
                        "  KEK {:<18} {:<11} {}",
                        k["kek_id"].as_str().unwrap_or("-"),
                        k["provider"].as_str().unwrap_or(""),
                        k["created_at"].as_str().unwrap_or("")
                    );
                }
                s
            });
        }
        KmsCmd::Rotate {
            new_key_file,
            new_passphrase_file,
            new_kms_command,
        } => {
            let new = match (new_key_file, new_passphrase_file, new_kms_command) {
                (Some(k), _, _) => KeySource::KeyFile(k.clone()),
                (_, Some(p), _) => KeySource::from_env(None, Some(p.clone()))?,
                (_, _, Some(c)) => KeySource::Command(c.clone()),
                _ => {
                    return Err(Problem::new(
                        Code::UsageInvalidArgument,
                        "kms rotate needs the new KEK: --new-key-file, --new-passphrase-file or --new-kms-command",
                    ))
                }
            };
            let body = ops::kms_rotate(&r, &cli_actor(), &new)?;
            out.success("kms.rotate", body, |b| {
                format!(
                    "master key re-wrapped under KEK {}; {} old KEK(s) retired; no data rewritten\n",
                    b["new_kek"]["kek_id"].as_str().unwrap_or(""),
                    b["retired"].as_array().map_or(0, |a| a.len())
                )
            });
        }
        KmsCmd::Shred { confirm } => {
            let body = ops::kms_shred(&r, &cli_actor(), confirm)?;
            out.success("kms.shred", body, |_| {
                "every key envelope destroyed: the repository's data is unrecoverable\n".into()
            });
        }
    }
    Ok(())
}

fn audit_cmd(cli: &Cli, out: &mut Out, c: &AuditCmd) -> R {
    let r = open(cli)?;
    match c {
        AuditCmd::Search {
            since,
            action,
            deployment,
        } => {
            let f = pg_hardstorage_repo::audit::Filter {
                since: since.clone(),
                action: action.clone(),
                deployment: deployment.clone(),
            };
            let body = ops::audit_search(&r, &f)?;
            out.success("audit.search", body, |b| {
                let mut s = String::new();
                for e in b.as_array().cloned().unwrap_or_default() {
                    let _ = writeln!(
                        s,
                        "{:>6} {} {:<20} {:<18} {:<6} {}",
                        e["seq"],
                        e["time"].as_str().unwrap_or(""),
                        e["actor"].as_str().unwrap_or(""),
                        e["action"].as_str().unwrap_or(""),
                        e["result"].as_str().unwrap_or(""),
                        e["subject"]
                    );
                }
                s
            });
        }
        AuditCmd::VerifyChain => {
            let body = ops::audit_verify_chain(&r)?;
            out.success("audit.verify_chain", body, |b| {
                format!("audit chain intact: {} records\n", b["records"])
            });
        }
    }
    Ok(())
}

/// Who the audit log says ran a CLI command: `$USER` can be set to
/// anything, so the effective uid the kernel reports is recorded beside it.
fn cli_actor() -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid{uid}"));
    format!("cli:{user}(uid={uid})")
}

fn token_cmd(cli: &Cli, out: &mut Out, c: &TokenCmd) -> R {
    let r = open(cli)?;
    match c {
        TokenCmd::Create {
            verbs,
            tenant,
            name,
        } => {
            let name = match name {
                Some(n) => n.clone(),
                None => {
                    let mut b = [0u8; 4];
                    getrandom::fill(&mut b)
                        .map_err(|e| Problem::internal(format!("getrandom: {e}")))?;
                    format!("token-{}", hex::encode(b))
                }
            };
            let body = ops::tokens_create(&r, &cli_actor(), &name, verbs, tenant.clone())?;
            out.success("tokens.create", body, |b| {
                format!(
                    "token {} created; it is shown only now:\n{}\n",
                    b["name"].as_str().unwrap_or(""),
                    b["token"].as_str().unwrap_or("")
                )
            });
        }
        TokenCmd::List => {
            let body = ops::tokens_list(&r)?;
            out.success("tokens.list", body, |b| {
                let mut s = String::new();
                for t in b.as_array().cloned().unwrap_or_default() {
                    let _ = writeln!(
                        s,
                        "{:<24} {:<40} {}",
                        t["name"].as_str().unwrap_or(""),
                        t["verbs"]
                            .as_array()
                            .map(|v| v
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(","))
                            .unwrap_or_default(),
                        t["tenant"].as_str().unwrap_or("*")
                    );
                }
                s
            });
        }
        TokenCmd::Revoke { name } => {
            let body = ops::tokens_revoke(&r, &cli_actor(), name)?;
            out.success("tokens.revoke", body, |b| {
                format!("token {} revoked\n", b["name"].as_str().unwrap_or(""))
            });
        }
    }
    Ok(())
}

fn wal_cmd(cli: &Cli, out: &mut Out, c: &WalCmd) -> R {
    let r = open(cli)?;
    match c {
        WalCmd::Stream { deployment } => {
            let _agent =
                pg_hardstorage_repo::fleet::register(&r, "wal-stream", vec![deployment.clone()])?;
            out.stream_events();
            crate::signals::install();
            pg_hardstorage_repo::wal::stream(&r, deployment, &out.bus, &crate::signals::stopping)?;
            out.success(
                "wal.stream",
                json!({"deployment": deployment, "stopped": true}),
                |_| String::new(),
            );
        }
        WalCmd::List { deployment } => {
            let body = ops::wal_list(&r, deployment)?;
            out.success("wal.list", body, |b| {
                format!(
                    "{} segments ({} .. {}), {} gaps\n",
                    b["segments"].as_array().map_or(0, |a| a.len()),
                    b["first"].as_str().unwrap_or("-"),
                    b["last"].as_str().unwrap_or("-"),
                    b["gaps"].as_array().map_or(0, |a| a.len())
                )
            });
        }
        WalCmd::Fetch {
            deployment,
            segment,
            dest,
            spool,
            prefetch,
            fill_spool,
        } => {
            let spool = spool.as_deref().filter(|_| *prefetch > 0);
            let body = match spool {
                Some(sp) if *fill_spool => {
                    let n = restore::spool::fill(&r, deployment, sp, segment, *prefetch)?;
                    json!({"segment": segment, "prefetched": n})
                }
                _ => {
                    let n = pg_hardstorage_repo::wal::fetch(&r, deployment, segment, dest)?;
                    if let Some(sp) = spool {
                        start_fill(sp, segment);
                    }
                    json!({"segment": segment, "bytes": n})
                }
            };
            out.success("wal.fetch", body, |_| String::new());
        }
        WalCmd::Repair { deployment } => {
            out.stream_events();
            let body = ops::wal_repair(&r, &cli_actor(), deployment, &out.bus)?;
            out.success("wal.repair", body, |b| {
                format!(
                    "slot {} recreated at {}; archive ends at {}{}\n",
                    b["slot"].as_str().unwrap_or(""),
                    b["restart_lsn"].as_str().unwrap_or(""),
                    b["archived_until"].as_str().unwrap_or(""),
                    if b["gap"].is_null() {
                        ""
                    } else {
                        " (a gap was recorded)"
                    }
                )
            });
        }
    }
    Ok(())
}
