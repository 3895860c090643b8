use crate::{write_tree, Env};
use std::time::{Duration, Instant};

/// `kill -9` in the middle of a backup: committed backups still verify, the
/// partial one is not listed, and the next backup succeeds and reuses the
/// packs the killed one had already made durable.
#[test]
fn kill_9_mid_backup_leaves_the_repository_valid() {
    let env = Env::new();
    env.ok(&[
        "repo",
        "init",
        "--pack-size",
        "262144",
        "--chunk-size",
        "16384,65536,262144",
    ]);
    let small = env.path("small");
    write_tree(&small, 5, 10_000);
    env.ok(&[
        "deployment",
        "create",
        "s",
        "--path",
        small.to_str().expect("utf8"),
    ]);
    let committed = env.ok(&["backup", "run", "s"])["backup_id"]
        .as_str()
        .expect("id")
        .to_string();

    let big = env.path("big");
    write_tree(&big, 40, 1 << 20);
    env.ok(&[
        "deployment",
        "create",
        "b",
        "--path",
        big.to_str().expect("utf8"),
    ]);
    let mut child = env
        .cmd(&["backup", "run", "b", "-o", "json"])
        .env("PG_HARDSTORAGE_FAULT_PUT_DELAY_MS", "100")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn backup");
    // Wait until some packs are durable and indexed, then kill hard.
    let index = env.repo().join("index");
    let t = Instant::now();
    while std::fs::read_dir(&index).map(|d| d.count()).unwrap_or(0) < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "backup wrote no index in 60 s"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "backup finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill -9");
    child.wait().expect("reap");

    let list = env.ok(&["backup", "list"]);
    let ids: Vec<_> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|b| b["backup_id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(
        ids,
        vec![committed.clone()],
        "the killed backup must not be listed"
    );
    assert_eq!(env.ok(&["backup", "verify", &committed])["ok"], true);

    // The stale lease of the dead process is broken; the packs it wrote are reused.
    let next = env.ok(&["backup", "run", "b"]);
    let (chunks, new) = (
        next["chunks"].as_u64().expect("chunks"),
        next["bytes_added"].as_u64().expect("added"),
    );
    assert!(chunks > 0);
    assert!(
        new < next["bytes_logical"].as_u64().expect("logical"),
        "nothing was reused: {next}"
    );
    let id = next["backup_id"].as_str().expect("id").to_string();
    assert_eq!(env.ok(&["backup", "verify", &id])["ok"], true);
    let out = env.path("out");
    env.ok(&[
        "restore",
        "b",
        "--backup",
        &id,
        "--target",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(
        std::fs::read(big.join("f0039")).expect("src"),
        std::fs::read(out.join("f0039")).expect("dst")
    );
}
