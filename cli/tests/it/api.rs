//! `serve` as an operator runs it: the API answers with the same bodies as
//! the CLI under `-o json`, and SIGTERM lets a running stream finish.

use crate::Env;
use pg_hardstorage_testkit::http::Client;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

struct Served {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    client: Client,
}

fn serve(env: &Env, put_delay_ms: Option<&str>) -> Served {
    let mut c = env.cmd(&["serve", "--listen", "127.0.0.1:0", "-o", "ndjson"]);
    if let Some(d) = put_delay_ms {
        c.env("PG_HARDSTORAGE_FAULT_PUT_DELAY_MS", d);
    }
    started(c)
}

/// `serve` with at most `fds` open descriptors (`ulimit -n`) and `extra`
/// arguments.
fn serve_limited(env: &Env, fds: u32, extra: &[&str]) -> Served {
    let inner = env.cmd(&[]);
    let mut c = std::process::Command::new("sh");
    c.arg("-c")
        .arg(format!("ulimit -n {fds} && exec \"$0\" \"$@\""))
        .arg(inner.get_program())
        .args(["serve", "--listen", "127.0.0.1:0", "-o", "ndjson"])
        .args(extra);
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    started(c)
}

fn started(mut c: std::process::Command) -> Served {
    let mut child = c.stdout(Stdio::piped()).spawn().expect("serve");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first: Value =
        serde_json::from_str(&lines.next().expect("a line").expect("read")).expect("json");
    assert_eq!(first["op"], "server_listening", "{first}");
    let addr = first["body"]["address"]
        .as_str()
        .expect("addr")
        .parse()
        .expect("addr");
    Served {
        child,
        lines,
        client: Client::new(addr),
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of an API success envelope (its command checked).
fn api_body(r: &pg_hardstorage_testkit::http::Response, command: &str) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["command"], command);
    v["result"]["body"].clone()
}

#[test]
fn api_bodies_equal_the_cli_bodies_and_sigterm_lets_a_stream_finish() {
    let env = Env::new();
    env.ok(&["repo", "init"]);
    let src = env.path_deployment("web", 40, 200_000);
    env.ok(&["backup", "run", "web"]);
    let tok = env.ok(&[
        "token",
        "create",
        "--name",
        "ci",
        "--verbs",
        "backup:read,backup:create",
    ]);
    let secret = tok["token"].as_str().expect("shown once").to_string();
    assert!(secret.starts_with("phs.ci."));
    let listed = env.ok(&["token", "list"]);
    assert_eq!(listed[0]["name"], "ci");
    assert!(
        !listed.to_string().contains(&secret),
        "token list must not show secrets"
    );

    // Throttled puts keep the API backup below running long enough to be
    // caught by SIGTERM.
    let s = serve(&env, Some("300"));
    let c = s.client.with_token(&secret);
    for (cli, path, command) in [
        (
            vec!["deployment", "show", "web"],
            "/v1/deployments/web".to_string(),
            "deployments.show",
        ),
        (
            vec!["deployment", "list"],
            "/v1/deployments".to_string(),
            "deployments.list",
        ),
        (
            vec!["backup", "list", "web"],
            "/v1/deployments/web/backups".to_string(),
            "backups.list",
        ),
    ] {
        assert_eq!(env.ok(&cli), api_body(&c.get(&path), command), "{cli:?}");
    }
    let id = env.ok(&["backup", "list", "web"])[0]["backup_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(
        env.ok(&["backup", "show", &id]),
        api_body(
            &c.get(&format!("/v1/deployments/web/backups/{id}")),
            "backups.show"
        )
    );

    let target = env.path("restored");
    let restored = env.ok(&[
        "restore",
        "web",
        "--backup",
        &id,
        "--target",
        target.to_str().expect("utf8"),
    ]);
    let rid = restored["restore_id"]
        .as_str()
        .expect("restore id")
        .to_string();
    assert_eq!(
        env.ok(&["restore", "web", "--status", &rid]),
        api_body(
            &c.get(&format!("/v1/deployments/web/restores/{rid}")),
            "restores.status"
        )
    );
    assert_eq!(
        env.ok(&["wal", "list", "web"]),
        api_body(&c.get("/v1/deployments/web/wal"), "wal.list")
    );

    // The server registered itself as an agent of this repository.
    let agents = env.ok(&["agent", "list"]);
    assert_eq!(
        (agents[0]["role"].as_str(), agents[0]["state"].as_str()),
        (Some("server"), Some("online")),
        "{agents}"
    );

    // A backup stream in flight when SIGTERM arrives still completes.
    std::fs::write(src.join("new"), vec![9u8; 3 << 20]).expect("write");
    let c2 = c.clone();
    let stream = std::thread::spawn(move || c2.post("/v1/deployments/web/backups", "{}"));
    let t0 = std::time::Instant::now();
    while !c
        .get("/metrics")
        .text()
        .contains("pg_hardstorage_pipelines_running 1")
    {
        assert!(t0.elapsed().as_secs() < 60, "the backup never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    let r = stream.join().expect("stream thread");
    let last: Value = String::from_utf8_lossy(&r.body)
        .lines()
        .last()
        .map(|l| serde_json::from_str(l).expect("json"))
        .expect("events");
    assert_eq!(last["op"], "backup_completed", "{}", r.text());
    let mut s = s;
    let status = s.child.wait().expect("exit");
    assert!(status.success(), "{status:?}");
    let rest: Vec<String> = s.lines.by_ref().map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("server_stopped")),
        "{rest:?}"
    );
    assert_eq!(
        env.ok(&["backup", "list", "web"])
            .as_array()
            .map(|a| a.len()),
        Some(2)
    );
    assert_eq!(env.ok(&["agent", "list"])[0]["state"], "stopped");
}

#[test]
fn search_finds_backups_across_deployments_by_field() {
    let env = Env::new();
    env.ok(&["repo", "init"]);
    for d in ["a", "b"] {
        env.path_deployment(d, 2, 1000);
    }
    let a1 = env.backup_id("a");
    let a2 = env.backup_id("a");
    let b1 = env.backup_id("b");
    env.ok(&["backup", "hold", &a2]);
    env.ok(&["backup", "delete", &a1]);
    let ids = |q: &[&str]| -> Vec<String> {
        let mut a = vec!["search"];
        a.extend_from_slice(q);
        env.ok(&a)
            .as_array()
            .expect("results")
            .iter()
            .map(|b| b["backup_id"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(ids(&[]), [b1.as_str(), a2.as_str()], "live, newest first");
    assert_eq!(ids(&["deployment:a"]), [a2.as_str()]);
    assert_eq!(ids(&["status:deleted"]), [a1.as_str()]);
    assert_eq!(ids(&["status:any", "deployment:a"]).len(), 2);
    assert_eq!(ids(&["held:true"]), [a2.as_str()]);
    assert_eq!(ids(&["held:false"]), [b1.as_str()]);
    assert_eq!(ids(&["since:1h", "kind:full"]).len(), 2);
    assert!(ids(&["until:2000-01-01T00:00:00Z"]).is_empty());
    assert_eq!(ids(&["b.full"]), [b1.as_str()]);
    let (code, v) = env.json(&["search", "colour:red"]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (2, Some("usage.invalid_argument")),
        "{v}"
    );
}

/// `schemathesis` fuzzes the live server against `api/openapi.yaml`:
/// every response must match the documented status codes, content types
/// and schemas, invalid input must be refused with a 4xx, auth must not be
/// ignored, and undocumented methods must get 405. It runs with a
/// `backup:read` token: the write routes (which would back up or restore
/// paths it invents) are covered by the HTTP tests of the apiserver crate.
#[test]
fn schemathesis_finds_no_contract_violation() {
    let st = std::process::Command::new("schemathesis")
        .arg("--version")
        .output();
    assert!(
        st.is_ok_and(|o| o.status.success()),
        "schemathesis is not installed: pip install schemathesis (scripts/test.sh does)"
    );
    let env = Env::new();
    env.ok(&["repo", "init"]);
    env.path_deployment("web", 5, 10_000);
    env.ok(&["backup", "run", "web"]);
    let tok = env.ok(&[
        "token",
        "create",
        "--name",
        "fuzz",
        "--verbs",
        "backup:read",
    ]);
    let secret = tok["token"].as_str().expect("token").to_string();
    let s = serve(&env, None);
    let schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/openapi.yaml");
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/schemathesis.toml");
    let out = std::process::Command::new("schemathesis")
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(&schema)
        .args(["--url", &format!("http://{}", s.client.addr)])
        .args(["-H", &format!("Authorization: Bearer {secret}")])
        .args(["--max-examples", "30"])
        .current_dir(env.tmp.path())
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .env("NO_COLOR", "1")
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    assert!(text.contains("passed"), "{text}");
}

#[test]
fn cli_holds_and_deletes_with_the_contract_exit_codes() {
    let env = Env::new();
    env.ok(&["repo", "init"]);
    env.path_deployment("w", 3, 1000);
    let id = env.backup_id("w");
    let h = env.ok(&["backup", "hold", &id, "--reason", "audit"]);
    assert!(
        h["by"].as_str().is_some_and(|b| b.starts_with("cli:")),
        "{h}"
    );
    assert_eq!(env.ok(&["backup", "list", "w"])[0]["held"], true);
    let (code, v) = env.json(&["backup", "delete", &id]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (7, Some("backup.held")),
        "{v}"
    );
    let (code, v) = env.json(&["backup", "hold", &id, "--until", "soon"]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (2, Some("usage.invalid_time")),
        "{v}"
    );
    assert_eq!(env.ok(&["backup", "release", &id])["released"], true);
    let (code, v) = env.json(&["backup", "release", &id]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (6, Some("hold.not_found")),
        "{v}"
    );
    env.ok(&["backup", "delete", &id, "--reason", "test"]);
    assert_eq!(env.ok(&["backup", "list", "w"]), serde_json::json!([]));
    assert_eq!(
        env.ok(&["backup", "show", &id])["deleted"]["reason"],
        "test"
    );
    let target = env.path("r");
    let (code, v) = env.json(&[
        "restore",
        "w",
        "--backup",
        &id,
        "--target",
        target.to_str().expect("utf8"),
    ]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (6, Some("backup.deleted")),
        "{v}"
    );
}

#[test]
fn cli_operations_are_audited_and_verify_chain_exits_9_on_tampering() {
    let env = Env::new();
    env.ok(&["repo", "init"]);
    env.path_deployment("w", 2, 100);
    env.ok(&["backup", "run", "w"]);
    env.ok(&["token", "create", "--name", "t", "--verbs", "backup:read"]);
    let ev = env.ok(&["audit", "search"]);
    let actions: Vec<_> = ev
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["action"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        actions,
        ["deployment.create", "backup.take", "token.create"]
    );
    // The kernel's uid beside $USER, which anyone can set.
    let uid = unsafe { libc::geteuid() };
    assert!(
        ev[0]["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with("cli:") && a.ends_with(&format!("(uid={uid})"))),
        "{}",
        ev[0]
    );
    assert_eq!(
        env.ok(&[
            "audit",
            "search",
            "--action",
            "backup.take",
            "--deployment",
            "w"
        ])
        .as_array()
        .map(|a| a.len()),
        Some(1)
    );
    assert_eq!(env.ok(&["audit", "verify-chain"])["records"], 3);
    let rec = env.repo().join("audit/00000000000000000001");
    let mut b = std::fs::read(&rec).expect("record");
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&rec, b).expect("write");
    let (code, v) = env.json(&["audit", "verify-chain"]);
    assert_eq!(code, 9, "{v}");
    assert_eq!(v["error"]["code"], "verify.audit_chain_broken");
    assert_eq!(v["error"]["subject"]["position"], 1);
}

/// `--webhook` on any command: the receiver gets exactly the lines the
/// command prints under `-o ndjson`.
#[test]
fn cli_webhook_receives_the_same_events_as_the_ndjson_output() {
    let hook = pg_hardstorage_testkit::http::Receiver::start();
    let env = Env::new();
    env.ok(&["repo", "init"]);
    env.path_deployment("w", 3, 50_000);
    let out = env.run(&["backup", "run", "w", "-o", "ndjson", "--webhook", &hook.url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert!(
        printed
            .last()
            .is_some_and(|l| l.contains("backup_completed")),
        "{printed:?}"
    );
    // Delivered before the process exited.
    assert_eq!(hook.lines(), printed);
    let (code, v) = env.json(&["backup", "list", "--webhook", "ftp://nope"]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (2, Some("usage.invalid_argument")),
        "{v}"
    );
}

/// CPU ticks (user + system) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th of the whole line.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// Out of descriptors, the server backs off instead of spinning on
/// `accept`, and answers again once connections close; with its default
/// cap (half its descriptors) it answers the excess 503 instead.
#[test]
fn serve_out_of_descriptors_backs_off_and_keeps_answering() {
    let env = Env::new();
    env.ok(&["repo", "init"]);
    let connect = |s: &Served| -> Vec<std::net::TcpStream> {
        (0..100)
            .map(|_| std::net::TcpStream::connect(s.client.addr).expect("connect"))
            .collect()
    };
    // A cap above the descriptor limit: accept runs into EMFILE.
    let s = serve_limited(&env, 64, &["--max-connections", "1000"]);
    let idle = connect(&s);
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(s.child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(s.child.id()) - before;
    assert!(
        used < 50,
        "{used} ticks of CPU in 2 s out of descriptors: spinning"
    );
    drop(idle);
    let t = Instant::now();
    while s
        .client
        .request("GET", "/v1/healthz", &[], None)
        .map(|r| r.status)
        .ok()
        != Some(200)
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "healthz never answered again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(s);
    // The default cap: the excess is answered at once.
    let s = serve_limited(&env, 64, &[]);
    let _idle = connect(&s);
    std::thread::sleep(Duration::from_millis(300));
    let r = s
        .client
        .request("GET", "/v1/healthz", &[], None)
        .expect("an answer");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "api.busy", "{}", r.text());
}
