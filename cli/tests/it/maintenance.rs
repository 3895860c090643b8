//! `repo check`, `repo scrub`, `repo usage` and `repo gc` as an operator
//! runs them: exit codes, the bodies, the damaged pack named.

use crate::Env;

fn packs(env: &Env) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for fan in std::fs::read_dir(env.repo().join("packs")).expect("packs") {
        for p in std::fs::read_dir(fan.expect("dir").path()).expect("fan") {
            out.push(p.expect("pack").path());
        }
    }
    out.sort();
    out
}

#[test]
fn scrub_names_the_damaged_pack_and_the_backups_it_breaks() {
    let env = Env::new();
    env.ok(&["repo", "init", "--pack-size", "1048576"]);
    env.path_deployment("a", 8, 400_000);
    env.path_deployment("b", 3, 300_000);
    let ida = env.backup_id("a");
    let idb = env.backup_id("b");
    let healthy = env.ok(&["repo", "check"]);
    assert_eq!(healthy["ok"], true, "{healthy}");
    let clean = env.ok(&["repo", "scrub"]);
    assert_eq!(clean["bad"], serde_json::json!([]));
    assert!(clean["packs"].as_u64().is_some_and(|n| n >= 3), "{clean}");
    let usage = env.ok(&["repo", "usage"]);
    assert!(
        usage["data_packs"].as_u64().is_some_and(|n| n > 3_000_000),
        "{usage}"
    );
    assert_eq!(usage["garbage"], 0);

    // One byte flipped in the middle of one pack.
    let b_pack = packs(&env).pop().expect("a pack");
    let mut bytes = std::fs::read(&b_pack).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&b_pack, bytes).expect("write");
    let name = format!(
        "packs/{}/{}",
        b_pack
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .expect("fan"),
        b_pack.file_name().and_then(|n| n.to_str()).expect("name")
    );
    let (code, v) = env.json(&["repo", "scrub"]);
    assert_eq!(code, 9, "{v}");
    assert_eq!(v["error"]["code"], "verify.scrub_failed");
    let bad = &v["error"]["subject"]["report"]["bad"];
    assert_eq!(
        bad.as_array().map(|a| a.len()),
        Some(1),
        "exactly one pack: {v}"
    );
    assert_eq!(bad[0]["pack"], name.as_str());
    let breaks: Vec<&str> = bad[0]["breaks"]
        .as_array()
        .expect("breaks")
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    assert!(!breaks.is_empty(), "{v}");
    for id in &breaks {
        assert!(*id == ida || *id == idb, "{id}");
    }

    // --apply quarantines it: out of packs/, kept under quarantine/.
    let (code, v) = env.json(&["repo", "scrub", "--apply"]);
    assert_eq!(code, 9, "{v}");
    assert!(!b_pack.exists());
    assert!(env.repo().join("quarantine").join(&name).exists());
    // The broken backups are now what `repo check` reports.
    let (code, v) = env.json(&["repo", "check"]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (9, Some("verify.repository_damaged")),
        "{v}"
    );
    assert_eq!(
        env.ok(&["audit", "search", "--action", "repo.scrub"])
            .as_array()
            .map(|a| a.len()),
        Some(1)
    );
}

#[test]
fn gc_dry_run_by_default_then_apply_reclaims_a_deleted_backup() {
    let env = Env::new();
    env.ok(&["repo", "init", "--pack-size", "1048576"]);
    env.path_deployment("a", 6, 500_000);
    env.path_deployment("b", 2, 100_000);
    let ida = env.backup_id("a");
    env.ok(&["backup", "run", "b"]);
    env.ok(&["backup", "delete", &ida]);
    let before = env.ok(&["repo", "usage"]);
    let dry = env.ok(&["repo", "gc", "--grace", "0s"]);
    assert_eq!(
        (dry["applied"].clone(), dry["packs_removed"].clone()),
        (serde_json::json!(false), serde_json::json!(0))
    );
    assert!(
        dry["packs_garbage"].as_u64().is_some_and(|n| n > 0),
        "{dry}"
    );
    assert_eq!(
        env.ok(&["repo", "usage"]),
        before,
        "a dry run changes nothing"
    );
    let done = env.ok(&["repo", "gc", "--apply", "--grace", "0s"]);
    assert_eq!(done["applied"], true);
    let after = env.ok(&["repo", "usage"]);
    let (b0, b1) = (
        before["data_packs"].as_u64().expect("n"),
        after["data_packs"].as_u64().expect("n"),
    );
    assert!(b1 + 2_500_000 < b0, "usage must drop: {b0} -> {b1}");
    env.ok(&["repo", "check"]);
    let (code, v) = env.json(&["repo", "gc", "--grace", "forever"]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (2, Some("usage.invalid_argument"))
    );
    assert_eq!(
        env.ok(&["audit", "search", "--action", "repo.gc"])
            .as_array()
            .map(|a| a.len()),
        Some(1)
    );
}

#[test]
fn prune_keeps_the_newest_and_held_backups_and_deletes_the_rest_on_apply() {
    let env = Env::new();
    env.ok(&["repo", "init"]);
    env.path_deployment("w", 2, 1000);
    let ids: Vec<String> = (0..3).map(|_| env.backup_id("w")).collect();
    env.ok(&["backup", "hold", &ids[0]]);
    let (code, v) = env.json(&["backup", "prune", "w"]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (2, Some("usage.invalid_argument"))
    );
    let dry = env.ok(&["backup", "prune", "w", "--keep-last", "1"]);
    assert_eq!(
        (dry["kept"].clone(), dry["deleted"].clone()),
        (serde_json::json!(2), serde_json::json!(1)),
        "{dry}"
    );
    assert_eq!(
        env.ok(&["backup", "list", "w"]).as_array().map(|a| a.len()),
        Some(3)
    );
    let done = env.ok(&["backup", "prune", "w", "--keep-last", "1", "--apply"]);
    assert_eq!(done["applied"], true);
    let left: Vec<String> = env
        .ok(&["backup", "list", "w"])
        .as_array()
        .expect("list")
        .iter()
        .map(|b| b["backup_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        left,
        [ids[0].clone(), ids[2].clone()],
        "held and newest stay"
    );
    assert_eq!(
        env.ok(&["backup", "show", &ids[1]])["deleted"]["reason"],
        "retention policy"
    );
}

/// A toy external KMS: `wrap` stores the key under a random handle in a
/// vault directory and prints the handle; `unwrap` prints the key back.
fn toy_kms(env: &Env) -> String {
    let vault = env.path("vault");
    std::fs::create_dir_all(&vault).expect("vault");
    let script = env.path("kms.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\nV='{}'\ncase \"$1\" in\n  wrap) h=$(od -An -tx1 -N8 /dev/urandom | tr -d ' \\n'); cat > \"$V/$h\"; echo \"$h\";;\n  unwrap) read h; cat \"$V/$h\";;\n  *) exit 2;;\nesac\n",
            vault.display()
        ),
    )
    .expect("script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script.display().to_string()
}

#[test]
fn kms_rotate_retires_the_old_kek_and_shred_destroys_the_repository() {
    let env = Env::new();
    env.ok(&["repo", "init"]);
    let src = env.path_deployment("w", 3, 20_000);
    let id = env.backup_id("w");
    let ring = env.ok(&["kms", "inspect"]);
    assert_eq!(ring["keks"].as_array().map(|a| a.len()), Some(1));
    assert_eq!(ring["keks"][0]["provider"], "passphrase");
    assert!(
        !ring.to_string().contains("wrapped"),
        "no key material: {ring}"
    );

    // Rotate to a key file: the passphrase no longer opens anything.
    let kf = env.path("new.key");
    std::fs::write(&kf, "5a".repeat(32)).expect("key");
    let kfs = kf.to_str().expect("utf8");
    let rot = env.ok(&["kms", "rotate", "--new-key-file", kfs]);
    assert_eq!(
        (
            rot["data_rewritten"].clone(),
            rot["retired"].as_array().map(|a| a.len())
        ),
        (serde_json::json!(false), Some(1))
    );
    let (code, v) = env.json(&["backup", "list", "w"]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (3, Some("auth.bad_key")),
        "old KEK retired: {v}"
    );
    let target = env.path("r1");
    env.ok(&[
        "restore",
        "w",
        "--backup",
        &id,
        "--target",
        target.to_str().expect("utf8"),
        "--key-file",
        kfs,
    ]);
    let (ok, _) = (
        std::process::Command::new("diff")
            .arg("-r")
            .arg(&src)
            .arg(&target)
            .status()
            .expect("diff"),
        (),
    );
    assert!(ok.success());

    // Rotate again, to the external KMS command.
    let kms = toy_kms(&env);
    env.ok(&[
        "kms",
        "rotate",
        "--new-kms-command",
        &kms,
        "--key-file",
        kfs,
    ]);
    let (code, _) = env.json(&["backup", "list", "w", "--key-file", kfs]);
    assert_eq!(code, 3, "the key file is retired too");
    let target = env.path("r2");
    env.ok(&[
        "restore",
        "w",
        "--backup",
        &id,
        "--target",
        target.to_str().expect("utf8"),
        "--kms-command",
        &kms,
    ]);
    assert_eq!(
        env.ok(&["kms", "inspect", "--kms-command", &kms])["keks"][0]["provider"],
        "command"
    );
    // The KMS unreachable: kms.unavailable, exit 8.
    let (code, v) = env.json(&["backup", "list", "w", "--kms-command", "false"]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (8, Some("kms.unavailable")),
        "{v}"
    );

    // Shred: needs the repository id, then nothing opens it.
    let (code, v) = env.json(&["kms", "shred", "--confirm", "yes", "--kms-command", &kms]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (2, Some("usage.invalid_argument"))
    );
    let repo_id = env.ok(&["repo", "show", "--kms-command", &kms])["repo_id"]
        .as_str()
        .expect("id")
        .to_string();
    env.ok(&["kms", "shred", "--confirm", &repo_id, "--kms-command", &kms]);
    let target = env.path("r3");
    let (code, v) = env.json(&[
        "restore",
        "w",
        "--backup",
        &id,
        "--target",
        target.to_str().expect("utf8"),
        "--kms-command",
        &kms,
    ]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (3, Some("kms.key_destroyed")),
        "{v}"
    );
    let (code, v) = env.json(&["backup", "list"]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (3, Some("kms.key_destroyed")),
        "{v}"
    );
    assert!(!target.exists());
}
