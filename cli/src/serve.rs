//! `serve`: runs the REST API server until SIGTERM or SIGINT.

use crate::commands::{open, restore_command_base};
use crate::output::Out;
use crate::{Cli, ServeArgs};
use pg_hardstorage_apiserver::{tls::TlsFiles, Server, ServerConfig};
use pg_hardstorage_engine::event::{Event, Severity};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

pub fn serve(cli: &Cli, out: &mut Out, a: &ServeArgs) -> Result<(), Problem> {
    let repo = open(cli)?;
    let listen = a.listen.parse().map_err(|e| {
        Problem::new(
            Code::UsageInvalidArgument,
            format!("--listen {:?}: {e}", a.listen),
        )
        .suggest("Give HOST:PORT, e.g. 127.0.0.1:8432", None)
    })?;
    let base = restore_command_base(cli);
    let webhooks = crate::commands::webhooks(cli)?;
    let cfg = ServerConfig {
        listen,
        tls: a.tls_cert.as_ref().map(|cert| TlsFiles {
            cert: cert.clone(),
            key: a.tls_key.clone().unwrap_or_default(),
            client_ca: a.client_ca.clone(),
        }),
        repo,
        restore_command: Arc::new(move |d: &str| base.clone().map(|b| format!("{b} {d} %f %p"))),
        webhooks,
        body_limit: a.body_limit,
        shutdown_grace: Duration::from_secs(a.shutdown_grace),
        wal_streams: a.wal_stream.clone(),
        kms_dir: a.kms_dir.clone(),
        max_connections: a.max_connections,
        max_operations: a.max_operations,
    };
    let _agent = pg_hardstorage_repo::fleet::register(&cfg.repo, "server", a.wal_stream.clone())?;
    let rt = pg_hardstorage_apiserver::runtime()?;
    let server = Server::bind(&rt, cfg)?;
    let addr = server.local_addr()?;
    let state = server.state();
    let scheme = if a.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    out.stream_events();
    out.bus.publish(
        Event::new(Severity::Notice, "server_listening").body(json!({
            "address": addr.to_string(),
            "url": format!("{scheme}://{addr}"),
            "tls": a.tls_cert.is_some(),
            "mtls": a.client_ca.is_some(),
        })),
    );
    if out.format == crate::output::Format::Table && !out.quiet {
        eprintln!("listening on {scheme}://{addr}");
    }
    rt.block_on(server.run(async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }));
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(state);
    out.bus
        .publish(Event::new(Severity::Notice, "server_stopped").body(json!({
            "address": addr.to_string(),
        })));
    out.success(
        "serve",
        json!({"address": addr.to_string(), "stopped": true}),
        |_| String::new(),
    );
    Ok(())
}
