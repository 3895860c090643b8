//! Every implemented route over real HTTP: envelope, status, error codes.

use crate::{body_of, dirs_equal, error_of, ndjson, TestServer};
use bytes::Bytes;
use serde_json::json;

#[test]
fn deployments_routes_and_request_errors() {
    let s = TestServer::start();
    let c = s.admin();
    // Open routes.
    assert_eq!(
        body_of(&s.client().get("/v1/healthz"), "health.live")["status"],
        "ok"
    );
    assert_eq!(
        body_of(&s.client().get("/v1/readyz"), "health.ready")["ready"],
        true
    );

    let src = s.tmp.path().join("web-src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let create = json!({"name": "web", "path": src}).to_string();
    let b = body_of(&c.post("/v1/deployments", &create), "deployments.create");
    assert_eq!(
        (b["created"].clone(), b["kind"].clone()),
        (json!(true), json!("path"))
    );
    // Idempotent on name; conflicting settings are a 409.
    let b = body_of(&c.post("/v1/deployments", &create), "deployments.create");
    assert_eq!(b["created"], false);
    let other = json!({"name": "web", "path": s.tmp.path()}).to_string();
    error_of(
        &c.post("/v1/deployments", &other),
        409,
        "deployment.conflict",
    );

    let list = body_of(&c.get("/v1/deployments"), "deployments.list");
    assert_eq!(list.as_array().map(|a| a.len()), Some(1));
    let show = body_of(&c.get("/v1/deployments/web"), "deployments.show");
    assert_eq!(show["name"], "web");
    error_of(&c.get("/v1/deployments/nope"), 404, "deployment.not_found");
    error_of(
        &c.get("/v1/deployments/bad%20name"),
        400,
        "usage.invalid_argument",
    );

    let patch = json!({"path": s.tmp.path()}).to_string();
    let r = c
        .request("PATCH", "/v1/deployments/web", &[], Some(patch.as_bytes()))
        .expect("patch");
    let b = body_of(&r, "deployments.update");
    assert_eq!(b["path"], s.tmp.path().display().to_string());

    // Bodies: unknown fields, not JSON, too large.
    error_of(
        &c.post(
            "/v1/deployments",
            r#"{"name":"x","path":"/tmp","colour":"red"}"#,
        ),
        400,
        "api.bad_request",
    );
    error_of(
        &c.post("/v1/deployments", "not json"),
        400,
        "api.bad_request",
    );
    let huge = format!(r#"{{"name":"x","path":"{}"}}"#, "a".repeat(100 << 10));
    error_of(&c.post("/v1/deployments", &huge), 400, "api.body_too_large");
    // Routes and methods.
    error_of(&c.get("/v1/nope"), 404, "api.route_not_found");
    let r = c.request("PUT", "/v1/healthz", &[], None).expect("put");
    error_of(&r, 405, "api.method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET"));

    let r = c
        .request("DELETE", "/v1/deployments/web", &[], None)
        .expect("delete");
    let b = body_of(&r, "deployments.delete");
    assert_eq!(
        (b["deleted"].clone(), b["backups_kept"].clone()),
        (json!(true), json!(true))
    );
    error_of(&c.get("/v1/deployments/web"), 404, "deployment.not_found");
}

#[test]
fn backups_verify_restore_and_wal_routes() {
    let s = TestServer::start();
    let c = s.admin();
    let src = s.path_deployment("p", None);
    s.path_deployment("q", None);
    let json_accept = [("Accept", "application/json")];

    // A backup answered as one envelope (Accept: application/json).
    let r = c
        .request("POST", "/v1/deployments/p/backups", &json_accept, None)
        .expect("backup");
    let b = body_of(&r, "backups.take");
    let id = b["backup_id"].as_str().expect("id").to_string();
    assert!(id.starts_with("p.full."), "{b}");
    assert_eq!(b["files"], 21);

    let list = body_of(&c.get("/v1/deployments/p/backups"), "backups.list");
    assert_eq!(list[0]["backup_id"], id.as_str());
    let m = body_of(
        &c.get(&format!("/v1/deployments/p/backups/{id}")),
        "backups.show",
    );
    assert_eq!(m["backup_id"], id.as_str());
    assert!(
        m["entries"].as_array().is_some_and(|e| e.len() > 20),
        "full manifest"
    );
    error_of(
        &c.get(&format!("/v1/deployments/q/backups/{id}")),
        404,
        "backup.not_found",
    );
    error_of(
        &c.get("/v1/deployments/p/backups/p.full.20200101T000000Z"),
        404,
        "backup.not_found",
    );

    // Verify, streamed.
    let r = c.post(&format!("/v1/deployments/p/backups/{id}/verify"), "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let ev = ndjson(&r.body);
    assert_eq!(
        ev.first().map(|e| e["op"].clone()),
        Some(json!("verify_started"))
    );
    assert_eq!(
        ev.last().map(|e| e["op"].clone()),
        Some(json!("verify_completed"))
    );
    assert!(r.body.ends_with(b"\n"));

    // Restore, streamed; then its status.
    let target = s.tmp.path().join("restored");
    let req = json!({"backup_id": id, "target": target}).to_string();
    let r = c.post("/v1/deployments/p/restores", &req);
    let ev = ndjson(&r.body);
    let last = ev.last().expect("events");
    assert_eq!(last["op"], "restore_completed", "{}", r.text());
    dirs_equal(&src, &target);
    let status_list = s.repo.store.list("restores/p/").expect("list");
    assert_eq!(status_list.len(), 1);
    let rid = status_list[0]
        .key
        .trim_start_matches("restores/p/")
        .to_string();
    let st = body_of(
        &c.get(&format!("/v1/deployments/p/restores/{rid}")),
        "restores.status",
    );
    assert_eq!(st["status"], "succeeded", "{st}");
    assert_eq!(st["result"]["restore_id"], rid.as_str());
    error_of(
        &c.get("/v1/deployments/p/restores/p.restore.nope"),
        404,
        "restore.not_found",
    );
    // A non-empty target is a pre-flight refusal: 412 before any stream.
    let r = c.post("/v1/deployments/p/restores", &req);
    let e = error_of(&r, 412, "restore.target_not_empty");
    assert!(e["suggestion"]["human"].as_str().is_some());
    error_of(
        &c.post(
            "/v1/deployments/p/restores",
            r#"{"target":"/tmp/x","speed":"max"}"#,
        ),
        400,
        "api.bad_request",
    );

    // WAL routes on a deployment with no archive.
    let w = body_of(&c.get("/v1/deployments/p/wal"), "wal.list");
    assert_eq!(w["segments"], json!([]));
    error_of(
        &c.post("/v1/deployments/p/wal/000000010000000000000001/fetch", ""),
        404,
        "wal.segment_not_found",
    );

    // A corrupted backup: 422 as an envelope, an error frame as a stream.
    let pack = s.repo.store.list("packs/").expect("list")[0].key.clone();
    let mut bytes = s
        .repo
        .store
        .get(&pack)
        .expect("get")
        .expect("pack")
        .to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    s.repo.store.put(&pack, Bytes::from(bytes)).expect("put");
    let verify = format!("/v1/deployments/p/backups/{id}/verify");
    let r = c
        .request("POST", &verify, &json_accept, None)
        .expect("verify");
    let e = error_of(&r, 422, "verify.checksum_mismatch");
    assert!(e["message"].as_str().is_some());
    let r = c.post(&verify, "");
    assert_eq!(r.status, 200);
    assert!(
        !r.body.ends_with(b"\n"),
        "a final error frame has no trailing newline"
    );
    let last = ndjson(&r.body).pop().expect("frame");
    assert_eq!(last["error"]["code"], "verify.checksum_mismatch", "{last}");

    // The repository unreachable: 503 (tokens are cached briefly, so the
    // request is authenticated and fails on the repository itself).
    std::fs::write(&s.outage_flag, b"").expect("flag");
    error_of(&c.get("/v1/deployments"), 503, "storage.unreachable");
    error_of(&s.client().get("/v1/readyz"), 503, "storage.unreachable");
    std::fs::remove_file(&s.outage_flag).expect("unflag");
    body_of(&c.get("/v1/deployments"), "deployments.list");
}

/// `api/openapi.yaml` is generated; CI fails when the committed file is
/// stale. `UPDATE_OPENAPI=1 cargo test -p pg_hardstorage_apiserver openapi`
/// rewrites it.
#[test]
fn committed_openapi_document_is_current_and_served() {
    let generated = pg_hardstorage_apiserver::openapi::yaml();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/openapi.yaml");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &generated).expect("write");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "api/openapi.yaml is stale: run UPDATE_OPENAPI=1 cargo test -p pg_hardstorage_apiserver openapi"
    );
    let doc = pg_hardstorage_apiserver::openapi::document();
    assert_eq!(doc["openapi"], "3.1.0");
    for route in pg_hardstorage_apiserver::routes::ROUTES {
        let op = &doc["paths"][route.path][route.method.to_ascii_lowercase()];
        assert!(op.is_object(), "{} {} missing", route.method, route.path);
        assert!(op["responses"]["200"].is_object());
    }
    assert!(doc["components"]["schemas"]["StartRestore"]["properties"]["target"].is_object());
    let s = TestServer::start();
    let r = s.admin().get("/v1/openapi.yaml");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), generated);
    error_of(
        &s.client().get("/v1/openapi.yaml"),
        401,
        "auth.token_required",
    );
}

#[test]
fn holds_block_deletes_and_deleted_backups_leave_lists_and_restores() {
    let s = TestServer::start();
    let c = s.admin();
    s.path_deployment("p", None);
    let json_accept = [("Accept", "application/json")];
    let take = || {
        let r = c
            .request("POST", "/v1/deployments/p/backups", &json_accept, None)
            .expect("backup");
        body_of(&r, "backups.take")["backup_id"]
            .as_str()
            .expect("id")
            .to_string()
    };
    let (old, new) = (take(), take());
    let base = format!("/v1/deployments/p/backups/{old}");
    let h = body_of(
        &c.post(&format!("{base}/hold"), r#"{"reason":"litigation 42"}"#),
        "backups.hold",
    );
    assert_eq!(h["by"], "token:admin");
    assert_eq!(h["reason"], "litigation 42");
    let list = body_of(&c.get("/v1/deployments/p/backups"), "backups.list");
    assert_eq!(list[0]["held"], true);
    assert_eq!(list[1]["held"], false);
    let del = |b: &str| {
        c.request("DELETE", &base, &[], Some(b.as_bytes()))
            .expect("delete")
    };
    let e = error_of(&del(""), 409, "backup.held");
    assert!(e["suggestion"]["command"]
        .as_str()
        .is_some_and(|x| x.contains("release")));
    error_of(
        &c.post(&format!("{base}/hold"), r#"{"until":"next tuesday"}"#),
        400,
        "usage.invalid_time",
    );
    let r = c
        .request("DELETE", &format!("{base}/hold"), &[], None)
        .expect("release");
    assert_eq!(body_of(&r, "backups.release")["released"], true);
    let r = c
        .request("DELETE", &format!("{base}/hold"), &[], None)
        .expect("release");
    error_of(&r, 404, "hold.not_found");
    // An expired hold no longer protects.
    body_of(
        &c.post(
            &format!("/v1/deployments/p/backups/{new}/hold"),
            r#"{"until":"2020-01-01T00:00:00Z"}"#,
        ),
        "backups.hold",
    );

    let t = body_of(&del(r#"{"reason":"superseded"}"#), "backups.delete");
    assert_eq!(
        (t["backup_id"].as_str(), t["reason"].as_str()),
        (Some(old.as_str()), Some("superseded"))
    );
    // Idempotent: deleting again returns the same tombstone.
    assert_eq!(
        body_of(&del(""), "backups.delete")["deleted_at"],
        t["deleted_at"]
    );
    let list = body_of(&c.get("/v1/deployments/p/backups"), "backups.list");
    let ids: Vec<_> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|b| b["backup_id"].clone())
        .collect();
    assert_eq!(ids, [json!(new)]);
    let shown = body_of(&c.get(&base), "backups.show");
    assert_eq!(shown["deleted"]["reason"], "superseded");
    let req = json!({"backup_id": old, "target": s.tmp.path().join("r")}).to_string();
    error_of(
        &c.post("/v1/deployments/p/restores", &req),
        404,
        "backup.deleted",
    );
    // The newer backup is deletable: its hold expired.
    let r = c
        .request(
            "DELETE",
            &format!("/v1/deployments/p/backups/{new}"),
            &[],
            None,
        )
        .expect("delete");
    body_of(&r, "backups.delete");
    assert_eq!(
        body_of(&c.get("/v1/deployments/p/backups"), "backups.list"),
        json!([])
    );
}

#[test]
fn mutating_operations_are_audited_in_a_chain_that_detects_tampering() {
    let s = TestServer::start();
    let c = s.admin();
    let src = s.tmp.path().join("a-src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("f"), b"x").expect("write");
    body_of(
        &c.post(
            "/v1/deployments",
            &json!({"name": "a", "path": src}).to_string(),
        ),
        "deployments.create",
    );
    let r = c
        .request(
            "POST",
            "/v1/deployments/a/backups",
            &[("Accept", "application/json")],
            None,
        )
        .expect("backup");
    let id = body_of(&r, "backups.take")["backup_id"]
        .as_str()
        .expect("id")
        .to_string();
    body_of(
        &c.post(&format!("/v1/deployments/a/backups/{id}/hold"), ""),
        "backups.hold",
    );
    // A refused delete is audited too, with its error code.
    let r = c
        .request(
            "DELETE",
            &format!("/v1/deployments/a/backups/{id}"),
            &[],
            None,
        )
        .expect("delete");
    error_of(&r, 409, "backup.held");

    let auditor = s
        .client()
        .with_token(&s.token("auditor", &["audit:read"], None));
    let all = body_of(&auditor.get("/v1/audit"), "audit.search");
    let actions: Vec<_> = all
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["action"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        actions,
        [
            "deployment.create",
            "backup.take",
            "backup.hold",
            "backup.delete"
        ],
        "{all}"
    );
    let del = &all[3];
    assert_eq!(
        (
            del["actor"].as_str(),
            del["result"].as_str(),
            del["error_code"].as_str()
        ),
        (Some("token:admin"), Some("error"), Some("backup.held"))
    );
    assert_eq!(all[1]["subject"]["backup_id"], id.as_str());
    let only = body_of(
        &auditor.get("/v1/audit?action=backup.hold&deployment=a&since=1%20hour%20ago"),
        "audit.search",
    );
    assert_eq!(only.as_array().map(|a| a.len()), Some(1));
    error_of(&auditor.get("/v1/audit?colour=red"), 400, "api.bad_request");
    error_of(
        &s.client()
            .with_token(&s.token("ro", &["backup:read"], None))
            .get("/v1/audit"),
        403,
        "authz.denied",
    );

    let v = body_of(
        &auditor.post("/v1/audit/verify-chain", ""),
        "audit.verify_chain",
    );
    // Four operations and the `auth.refused` record of the 403 above.
    assert_eq!(
        (v["records"].clone(), v["intact"].clone()),
        (json!(5), json!(true))
    );
    // One byte of record 1 edited: the chain breaks there.
    let key = "audit/00000000000000000001";
    let orig = s.repo.store.get(key).expect("get").expect("record");
    let mut b = orig.to_vec();
    b[20] ^= 0x40;
    s.repo.store.put(key, Bytes::from(b)).expect("put");
    let e = error_of(
        &auditor.post("/v1/audit/verify-chain", ""),
        422,
        "verify.audit_chain_broken",
    );
    assert_eq!(e["subject"]["position"], 1, "{e}");
    // Restored, then record 2 removed: the chain breaks at 2.
    s.repo.store.put(key, orig).expect("put");
    s.repo
        .store
        .delete("audit/00000000000000000002")
        .expect("delete");
    let e = error_of(
        &auditor.post("/v1/audit/verify-chain", ""),
        422,
        "verify.audit_chain_broken",
    );
    assert_eq!(e["subject"]["position"], 2, "{e}");
}

#[test]
fn repository_routes_show_check_usage_gc_and_scrub() {
    let s = TestServer::start();
    let c = s.admin();
    s.path_deployment("p", Some("acme"));
    s.backup("p");
    let show = body_of(&c.get("/v1/repos/default"), "repos.show");
    assert_eq!(show["tenants"], json!(["acme"]));
    let id = show["repo_id"].as_str().expect("id").to_string();
    body_of(&c.get(&format!("/v1/repos/{id}")), "repos.show");
    error_of(&c.get("/v1/repos/elsewhere"), 404, "repo.not_found");
    assert_eq!(
        body_of(&c.post("/v1/repos/default/check", ""), "repos.check")["ok"],
        true
    );
    let u = body_of(&c.get("/v1/repos/default/usage"), "repos.usage");
    assert!(u["data_packs"].as_u64().is_some_and(|n| n > 0), "{u}");
    // GC streams its progress; dry-run unless apply=true.
    let r = c.post("/v1/repos/default/gc?grace_seconds=0", "");
    let ev = ndjson(&r.body);
    assert_eq!(
        ev.first().map(|e| e["op"].clone()),
        Some(json!("gc_started"))
    );
    let last = ev.last().expect("events");
    assert_eq!(last["op"], "gc_completed");
    assert_eq!(last["body"]["applied"], false);
    error_of(
        &c.post("/v1/repos/default/gc?apply=maybe", ""),
        400,
        "api.bad_request",
    );
    let r = c
        .request(
            "POST",
            "/v1/repos/default/gc?apply=true&grace_seconds=0",
            &[("Accept", "application/json")],
            None,
        )
        .expect("gc");
    assert_eq!(body_of(&r, "repos.gc")["applied"], true);
    let r = c
        .request(
            "POST",
            "/v1/repos/default/scrub",
            &[("Accept", "application/json")],
            None,
        )
        .expect("scrub");
    assert_eq!(body_of(&r, "repos.scrub")["bad"], json!([]));
    // A damaged pack: scrub answers 422 naming it.
    let pack = s.repo.store.list("packs/").expect("list")[0].key.clone();
    let mut b = s
        .repo
        .store
        .get(&pack)
        .expect("get")
        .expect("pack")
        .to_vec();
    let mid = b.len() / 2;
    b[mid] ^= 4;
    s.repo.store.put(&pack, Bytes::from(b)).expect("put");
    let r = c
        .request(
            "POST",
            "/v1/repos/default/scrub",
            &[("Accept", "application/json")],
            None,
        )
        .expect("scrub");
    let e = error_of(&r, 422, "verify.scrub_failed");
    assert_eq!(e["subject"]["report"]["bad"][0]["pack"], pack.as_str());
}

#[test]
fn doctor_routes_report_health_and_refuse_when_unhealthy() {
    let s = TestServer::start();
    let c = s.admin();
    s.path_deployment("p", None);
    // No backup yet: unhealthy, 412 with the report.
    let e = error_of(&c.get("/v1/doctor"), 412, "doctor.unhealthy");
    assert_eq!(
        e["subject"]["report"]["findings"][0]["code"],
        "doctor.no_backup"
    );
    s.backup("p");
    let rep = body_of(&c.get("/v1/doctor"), "doctor.report");
    assert_eq!(rep["healthy"], true, "{rep}");
    assert_eq!(
        body_of(&c.get("/v1/doctor/p"), "doctor.deployment")["deployments"][0]["name"],
        "p"
    );
    assert_eq!(
        body_of(&c.get("/v1/deployments/p/health"), "deployments.health")["healthy"],
        true
    );
    // Ages are whole seconds: let the backup be at least one second old.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let e = error_of(
        &c.get("/v1/doctor/p?max_age_seconds=0"),
        412,
        "doctor.unhealthy",
    );
    assert_eq!(
        e["subject"]["report"]["findings"][0]["code"],
        "doctor.backup_stale"
    );
    error_of(&c.get("/v1/doctor/nope"), 404, "deployment.not_found");
}

#[test]
fn kms_routes_rotate_the_kek_and_shred_stops_the_server_decrypting() {
    let s = TestServer::start();
    let c = s.admin();
    s.path_deployment("p", None);
    s.backup("p");
    let ring = body_of(&c.get("/v1/kms/inspect"), "kms.inspect");
    assert_eq!(ring["keks"].as_array().map(|a| a.len()), Some(1));
    let kf = s.tmp.path().join("rotated.key");
    std::fs::write(&kf, "7e".repeat(32)).expect("key");
    error_of(&c.post("/v1/kms/rotate", r#"{}"#), 400, "api.bad_request");
    let rotator = s
        .client()
        .with_token(&s.token("rot", &["kms:rotate"], None));
    // Only file names inside the server's --kms-dir; never commands.
    error_of(
        &rotator.post("/v1/kms/rotate", &json!({"new_key_file": kf}).to_string()),
        400,
        "api.bad_request",
    );
    error_of(
        &rotator.post(
            "/v1/kms/rotate",
            r#"{"new_kms_command":"touch /tmp/pwned"}"#,
        ),
        400,
        "api.bad_request",
    );
    let body = json!({"new_key_file": "rotated.key"}).to_string();
    let rot = body_of(&rotator.post("/v1/kms/rotate", &body), "kms.rotate");
    assert_eq!(rot["data_rewritten"], false);
    // The old passphrase no longer opens the repository; the new key does.
    let store = s.repo.store.clone();
    let old = pg_hardstorage_repo::Repository::open(store.clone(), &pg_hardstorage_testkit::key());
    assert_eq!(
        old.err().map(|p| p.code.to_string()),
        Some("auth.bad_key".into())
    );
    pg_hardstorage_repo::Repository::open(
        store.clone(),
        &pg_hardstorage_repo::KeySource::KeyFile(kf.clone()),
    )
    .expect("the new KEK opens it");
    // The server keeps working (the master key did not change).
    body_of(&c.get("/v1/deployments/p/backups"), "backups.list");
    // Shred: confirmation, then every route that touches data refuses.
    let shredder = s
        .client()
        .with_token(&s.token("shred", &["kms:shred"], None));
    let refused = shredder.post("/v1/kms/shred", r#"{"confirm":"no"}"#);
    error_of(&refused, 400, "usage.invalid_argument");
    let id = body_of(&c.get("/v1/repos/default"), "repos.show")["repo_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(
        !refused.text().contains(&id),
        "a refused shred must not tell the id it wants: {}",
        refused.text()
    );
    let done = body_of(
        &shredder.post("/v1/kms/shred", &json!({"confirm": id}).to_string()),
        "kms.shred",
    );
    assert_eq!(done["envelopes_destroyed"], 1);
    error_of(
        &c.get("/v1/deployments/p/backups"),
        403,
        "kms.key_destroyed",
    );
    let e =
        pg_hardstorage_repo::Repository::open(store, &pg_hardstorage_repo::KeySource::KeyFile(kf))
            .err()
            .expect("gone");
    assert_eq!(e.code.as_ref(), "kms.key_destroyed");
    body_of(&s.client().get("/v1/healthz"), "health.live");
}

#[test]
fn fleet_routes_list_agents_and_search_within_the_callers_tenant() {
    let s = TestServer::start();
    let c = s.admin();
    s.path_deployment("a1", Some("acme"));
    s.path_deployment("b1", Some("globex"));
    for d in ["a1", "b1"] {
        s.backup(d);
    }
    let reg = pg_hardstorage_repo::fleet::register(&s.repo, "wal-stream", vec!["a1".into()])
        .expect("register");
    let agents = body_of(&c.get("/v1/agents"), "agents.list");
    assert_eq!(
        (agents[0]["role"].as_str(), agents[0]["state"].as_str()),
        (Some("wal-stream"), Some("online"))
    );
    drop(reg);
    assert_eq!(
        body_of(&c.get("/v1/agents"), "agents.list")[0]["state"],
        "stopped"
    );
    let all = body_of(&c.get("/v1/search"), "search");
    assert_eq!(all.as_array().map(|a| a.len()), Some(2));
    let acme = s
        .client()
        .with_token(&s.token("acme", &["backup:read"], Some("acme")));
    let mine = body_of(&acme.get("/v1/search?q=kind%3Afull"), "search");
    assert_eq!(mine.as_array().map(|a| a.len()), Some(1));
    assert_eq!(mine[0]["deployment"], "a1");
    assert!(body_of(&acme.get("/v1/search?q=deployment%3Ab1"), "search")
        .as_array()
        .is_some_and(|a| a.is_empty()));
    error_of(
        &acme.get("/v1/search?q=colour%3Ared"),
        400,
        "usage.invalid_argument",
    );
}
