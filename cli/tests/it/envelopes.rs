use crate::{write_tree, Env};
use serde_json::Value;

fn assert_envelope(v: &Value, command: &str) {
    assert_eq!(v["schema"], "pg_hardstorage.v1", "{v}");
    assert_eq!(v["command"], command, "{v}");
    assert!(
        v["generated_at"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{v}"
    );
    assert!(
        v["result"]["body"].is_object() || v["result"]["body"].is_array(),
        "{v}"
    );
}

fn assert_error(v: &Value, code: &str) {
    assert_eq!(v["schema"], "pg_hardstorage.v1", "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["subject"].is_object(), "{v}");
}

#[test]
fn first_backup_list_show_restore_through_the_cli() {
    let env = Env::new();
    write_tree(&env.path("src"), 20, 50_000);
    let (code, v) = env.json(&["repo", "init"]);
    assert_eq!(code, 0, "{v}");
    assert_envelope(&v, "repo.init");
    let src = env.path("src");
    let d = env.ok(&[
        "deployment",
        "create",
        "web",
        "--path",
        src.to_str().expect("utf8"),
    ]);
    assert_eq!(d["created"], true);
    // Idempotent on name; a different path conflicts (exit 7).
    let d2 = env.ok(&[
        "deployment",
        "create",
        "web",
        "--path",
        src.to_str().expect("utf8"),
    ]);
    assert_eq!(d2["created"], false);
    let (code, v) = env.json(&["deployment", "create", "web", "--path", "/elsewhere"]);
    assert_eq!(code, 7, "{v}");
    assert_error(&v, "deployment.conflict");

    let (code, v) = env.json(&["backup", "run", "web"]);
    assert_eq!(code, 0, "{v}");
    assert_envelope(&v, "backups.take");
    let id = v["result"]["body"]["backup_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(id.starts_with("web.full.") && id.ends_with('Z'), "{id}");

    let (_, list) = env.json(&["backup", "list"]);
    assert_envelope(&list, "backups.list");
    assert_eq!(list["result"]["body"][0]["backup_id"], id);
    let show = env.ok(&["backup", "show", &id]);
    assert_eq!(show["stats"]["files"], 20);
    let ver = env.ok(&["backup", "verify", &id]);
    assert_eq!(ver["ok"], true);

    let target = env.path("restored");
    let r = env.ok(&[
        "restore",
        "web",
        "--backup",
        "latest",
        "--target",
        target.to_str().expect("utf8"),
    ]);
    assert_eq!(r["files"], 20);
    for i in [0, 7, 19] {
        let n = format!("f{i:04}");
        assert_eq!(
            std::fs::read(src.join(&n)).expect("src"),
            std::fs::read(target.join(&n)).expect("dst")
        );
    }
    // Restoring again into the now non-empty target is a pre-flight refusal.
    let (code, v) = env.json(&[
        "restore",
        "web",
        "--backup",
        &id,
        "--target",
        target.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 4, "{v}");
    assert_error(&v, "restore.target_not_empty");
    assert!(v["error"]["suggestion"]["human"].as_str().is_some());
}

#[test]
fn exit_codes_follow_the_contract() {
    let env = Env::new();
    write_tree(&env.path("src"), 3, 1000);
    env.ok(&["repo", "init"]);
    let src = env.path("src");
    env.ok(&[
        "deployment",
        "create",
        "a",
        "--path",
        src.to_str().expect("utf8"),
    ]);

    let (code, v) = env.json(&["backup", "show", "a.full.20200101T000000Z"]);
    assert_eq!(code, 6, "{v}");
    assert_error(&v, "backup.not_found");
    let (code, v) = env.json(&["deployment", "show", "nope"]);
    assert_eq!(code, 6, "{v}");
    assert_error(&v, "deployment.not_found");
    let (code, v) = env.json(&["backup", "show", "not-an-id"]);
    assert_eq!(code, 2, "{v}");
    assert_error(&v, "usage.invalid_argument");
    // Clap misuse.
    assert_eq!(env.run(&["backup", "frobnicate"]).status.code(), Some(2));
    // Wrong passphrase: exit 3 and a clear message.
    let o = env
        .cmd(&["backup", "list", "-o", "json"])
        .env("PG_HARDSTORAGE_PASSPHRASE", "wrong")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(3));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_error(&v, "auth.bad_key");
    // No key at all: exit 3 too, saying what to set.
    let o = env
        .cmd(&["backup", "list", "-o", "json"])
        .env_remove("PG_HARDSTORAGE_PASSPHRASE")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(3));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_error(&v, "auth.key_required");
    // No repository there: 6.
    let o = env
        .cmd(&["backup", "list", "-o", "json"])
        .env("PG_HARDSTORAGE_REPO", env.path("missing"))
        .output()
        .expect("run");
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // A second init is a conflict.
    let (code, v) = env.json(&["repo", "init"]);
    assert_eq!(code, 7, "{v}");
    assert_error(&v, "repo.already_exists");
    // A wrong confirmation is misuse: exit 2, nothing destroyed.
    let (code, v) = env.json(&["kms", "shred", "--confirm", "not-the-id"]);
    assert_eq!(code, 2, "{v}");
    assert_error(&v, "usage.invalid_argument");
    let (code, _) = env.json(&["kms", "inspect"]);
    assert_eq!(code, 0);
}

#[test]
fn corrupted_pack_makes_verify_exit_9() {
    let env = Env::new();
    write_tree(&env.path("src"), 5, 200_000);
    env.ok(&["repo", "init", "--pack-size", "65536"]);
    let src = env.path("src");
    env.ok(&[
        "deployment",
        "create",
        "c",
        "--path",
        src.to_str().expect("utf8"),
    ]);
    let id = env.ok(&["backup", "run", "c"])["backup_id"]
        .as_str()
        .expect("id")
        .to_string();
    let packs = env.repo().join("packs");
    let dir = std::fs::read_dir(&packs)
        .expect("packs")
        .flatten()
        .next()
        .expect("a pack dir")
        .path();
    let pack = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .next()
        .expect("a pack")
        .path();
    let mut b = std::fs::read(&pack).expect("read");
    let mid = b.len() / 2;
    b[mid] ^= 0xff;
    std::fs::write(&pack, b).expect("write");
    let (code, v) = env.json(&["backup", "verify", &id]);
    assert_eq!(code, 9, "{v}");
    assert_error(&v, "verify.checksum_mismatch");
}

#[test]
fn ndjson_streams_events_in_order() {
    let env = Env::new();
    write_tree(&env.path("src"), 10, 100_000);
    env.ok(&["repo", "init"]);
    let src = env.path("src");
    env.ok(&[
        "deployment",
        "create",
        "n",
        "--path",
        src.to_str().expect("utf8"),
    ]);
    let o = env
        .cmd(&["backup", "run", "n", "-o", "ndjson"])
        .env("PG_HARDSTORAGE_PROGRESS_MS", "1")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8(o.stdout).expect("utf8");
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert!(events.iter().all(|e| e["schema"] == "pg_hardstorage.v1"));
    assert_eq!(events.first().expect("first")["op"], "backup_started");
    let last = events.last().expect("last");
    assert_eq!(last["op"], "backup_completed");
    assert_eq!(last["severity_name"], "notice");
    assert_eq!(last["body"]["verified"], true);
    assert!(last["body"]["duration_seconds"].is_number());
    let progress = events
        .iter()
        .find(|e| e["op"] == "progress")
        .expect("a progress event");
    for k in [
        "bytes_logical",
        "bytes_physical",
        "dedup_ratio",
        "throughput_mb_s",
    ] {
        assert!(
            progress["body"][k].is_number(),
            "progress lacks {k}: {progress}"
        );
    }
}

#[test]
fn a_failing_stream_ends_with_an_error_frame_and_no_newline() {
    let env = Env::new();
    env.ok(&["repo", "init"]);
    let src = env.path("gone");
    std::fs::create_dir_all(&src).expect("mkdir");
    env.ok(&[
        "deployment",
        "create",
        "g",
        "--path",
        src.to_str().expect("utf8"),
    ]);
    std::fs::remove_dir(&src).expect("rmdir");
    let o = env.run(&["backup", "run", "g", "-o", "ndjson"]);
    assert_eq!(o.status.code(), Some(4));
    let text = String::from_utf8(o.stdout).expect("utf8");
    assert!(
        !text.ends_with('\n'),
        "error frame must not end with a newline: {text:?}"
    );
    let last: Value = serde_json::from_str(text.lines().last().expect("frame")).expect("json");
    assert_eq!(last["severity_name"], "error");
    assert_eq!(last["error"]["code"], "backup.source_unreadable");
}

/// `find REPO -perm /o=rwx` prints nothing on a fresh repository with one
/// backup: other users read nothing (with `--encryption none` they would
/// read the backed-up files; the key envelope invites offline guessing).
/// The repository's group may read, and its setgid root passes the group on.
#[test]
fn a_new_repository_is_closed_to_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    env.ok(&["repo", "init", "--encryption", "none"]);
    let src = env.path("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("secret"), b"0600 data").expect("write");
    let s = src.to_str().expect("utf8");
    env.ok(&["deployment", "create", "p", "--path", s]);
    env.ok(&["backup", "run", "p"]);
    let out = std::process::Command::new("find")
        .arg(env.repo())
        .args(["-perm", "/o=rwx"])
        .output()
        .expect("find");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "open to other users"
    );
    let root = std::fs::metadata(env.repo())
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(root & 0o2000, 0o2000, "setgid root: {root:o}");
    let files = std::process::Command::new("find")
        .arg(env.repo())
        .args(["-type", "f", "-perm", "/o=rwx,g=wx,u=x"])
        .output()
        .expect("find");
    assert_eq!(String::from_utf8_lossy(&files.stdout), "", "files are 0640");
}
