//! Authentication and authorisation over real HTTP: the 401/403 matrix for
//! every route, tenant isolation, and mutual TLS.

use crate::{body_of, error_of, Options, TestServer};
use pg_hardstorage_apiserver::routes::{Access, ROUTES};
use pg_hardstorage_apiserver::tls::TlsFiles;
use pg_hardstorage_testkit::http::{tls_client, Client};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

/// A verb other than `verb` (a token holding only it must be refused).
fn other_verb(verb: &str) -> &'static str {
    if verb == "audit:read" {
        "backup:read"
    } else {
        "audit:read"
    }
}

fn concrete(path: &str, id: &str) -> String {
    path.replace("{d}", "p")
        .replace("{id}", id)
        .replace("{seg}", "000000010000000000000001")
        .replace("{r}", "main")
        .replace("{deployment}", "p")
}

#[test]
fn every_route_denies_by_default_and_checks_its_verb() {
    let s = TestServer::start();
    s.path_deployment("p", None);
    let id = s.backup("p");
    let mut checked = 0;
    for route in ROUTES {
        let path = concrete(route.path, &id);
        let anon = s
            .client()
            .request(route.method, &path, &[], None)
            .expect("req");
        if route.access == Access::Open {
            assert_eq!(anon.status, 200, "{} {path}: {}", route.method, anon.text());
            continue;
        }
        error_of(&anon, 401, "auth.token_required");
        let bad = s
            .client()
            .with_token(
                "phs.admin.0000000000000000000000000000000000000000000000000000000000000000",
            )
            .request(route.method, &path, &[], None)
            .expect("req");
        error_of(&bad, 401, "auth.token_required");
        if let Access::Verb(v) = route.access {
            let name = format!("t{checked}");
            let lacking = s.token(&name, &[other_verb(v)], None);
            let r = s
                .client()
                .with_token(&lacking)
                .request(route.method, &path, &[], None)
                .expect("req");
            error_of(&r, 403, "authz.denied");
            let right = s.token(&format!("r{checked}"), &[v], None);
            // The right verb gets past authorisation (the route may still
            // refuse the request itself, e.g. a missing body or 501).
            let r = s
                .client()
                .with_token(&right)
                .request(route.method, &path, &[("Accept", "application/json")], None)
                .expect("req");
            assert!(
                r.status != 401 && r.status != 403,
                "{} {path} with {v}: {}",
                route.method,
                r.text()
            );
        }
        checked += 1;
    }
    assert!(checked >= 30, "{checked} routes checked");
}

#[test]
fn a_tenant_sees_only_its_deployments() {
    let s = TestServer::start();
    s.path_deployment("a1", Some("acme"));
    s.path_deployment("b1", Some("globex"));
    let acme = s
        .client()
        .with_token(&s.token("acme-ro", &["backup:read"], Some("acme")));
    let list = body_of(&acme.get("/v1/deployments"), "deployments.list");
    let names: Vec<_> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, ["a1"]);
    body_of(&acme.get("/v1/deployments/a1"), "deployments.show");
    error_of(&acme.get("/v1/deployments/b1"), 404, "deployment.not_found");
    error_of(
        &acme.get("/v1/deployments/b1/backups"),
        404,
        "deployment.not_found",
    );
    // An admin of one tenant cannot create deployments in another.
    let acme_admin = s
        .client()
        .with_token(&s.token("acme-admin", &["admin:*"], Some("acme")));
    let body = r#"{"name":"x","path":"/tmp","tenant":"globex"}"#;
    error_of(
        &acme_admin.post("/v1/deployments", body),
        403,
        "authz.denied",
    );
    let b = body_of(
        &acme_admin.post("/v1/deployments", r#"{"name":"x","path":"/tmp"}"#),
        "deployments.create",
    );
    assert_eq!(b["tenant"], "acme");
    // The unscoped admin sees everything.
    let all = body_of(&s.admin().get("/v1/deployments"), "deployments.list");
    assert_eq!(all.as_array().map(|a| a.len()), Some(3));
}

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
    rogue_client: (String, String),
}

fn issuer(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, cn);
    CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca")
}

fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    cn: &str,
    purpose: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![purpose];
    let cert = p.signed_by(&key, ca).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let ca = issuer("pg_hardstorage test CA");
    let rogue = issuer("someone else");
    Pki {
        ca: ca.pem(),
        server: leaf(&ca, "localhost", ExtendedKeyUsagePurpose::ServerAuth),
        client: leaf(&ca, "ops", ExtendedKeyUsagePurpose::ClientAuth),
        rogue_client: leaf(&rogue, "ops", ExtendedKeyUsagePurpose::ClientAuth),
    }
}

#[test]
fn mutual_tls_maps_the_certificate_cn_and_refuses_unsigned_clients() {
    let pki = pki();
    let dir = tempfile::tempdir().expect("tmp");
    let w = |n: &str, s: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, s).expect("write");
        p
    };
    let tls = TlsFiles {
        cert: w("server.pem", &pki.server.0),
        key: w("server.key", &pki.server.1),
        client_ca: Some(w("ca.pem", &pki.ca)),
    };
    let s = TestServer::start_with(Options {
        tls: Some(tls),
        ..Default::default()
    });
    s.path_deployment("p", None);
    // The CN "ops" maps to the token record of that name for its verbs.
    s.token("ops", &["backup:read"], None);

    // TLS without a client certificate: bearer tokens work as usual.
    let plain_tls = Client {
        tls: Some(tls_client(&pki.ca, None)),
        ..s.client()
    };
    body_of(
        &plain_tls.with_token(&s.admin).get("/v1/deployments"),
        "deployments.list",
    );
    error_of(
        &plain_tls.get("/v1/deployments"),
        401,
        "auth.token_required",
    );

    // A CA-signed client certificate authenticates as its CN.
    let ops = Client {
        tls: Some(tls_client(&pki.ca, Some((&pki.client.0, &pki.client.1)))),
        ..s.client()
    };
    let list = body_of(&ops.get("/v1/deployments"), "deployments.list");
    assert_eq!(list[0]["name"], "p");
    let e = error_of(
        &ops.post("/v1/deployments", r#"{"name":"y","path":"/tmp"}"#),
        403,
        "authz.denied",
    );
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains("ops")),
        "{e}"
    );

    // A certificate from another CA is refused in the handshake.
    let rogue = Client {
        tls: Some(tls_client(
            &pki.ca,
            Some((&pki.rogue_client.0, &pki.rogue_client.1)),
        )),
        ..s.client()
    };
    let r = rogue.request("GET", "/v1/deployments", &[], None);
    assert!(
        r.is_err(),
        "an unsigned client certificate must be refused: {r:?}"
    );
    // Plain HTTP to the TLS port gets no API answer.
    let r = s
        .client()
        .with_token(&s.admin)
        .request("GET", "/v1/healthz", &[], None);
    assert!(r.map(|r| r.status != 200).unwrap_or(true));
}

#[test]
fn tenant_bound_tokens_get_no_repository_wide_route_and_only_their_own_events() {
    let s = TestServer::start();
    s.path_deployment("a1", Some("acme"));
    s.path_deployment("b1", Some("globex"));
    for d in ["a1", "b1"] {
        s.backup(d);
    }
    let acme = s
        .client()
        .with_token(&s.token("acme-root", &["admin:*"], Some("acme")));
    for (m, p) in [
        ("GET", "/v1/repos/default"),
        ("GET", "/v1/repos/default/usage"),
        ("POST", "/v1/repos/default/gc"),
        ("GET", "/v1/kms/inspect"),
        ("POST", "/v1/kms/shred"),
        ("GET", "/v1/agents"),
        ("GET", "/metrics"),
    ] {
        let r = acme.request(m, p, &[], None).expect("req");
        let e = error_of(&r, 403, "authz.denied");
        assert!(
            e["message"]
                .as_str()
                .is_some_and(|x| x.contains("whole repository")),
            "{m} {p}: {e}"
        );
    }
    // Its own deployments only, in the audit log and in doctor.
    let events = body_of(&acme.get("/v1/audit"), "audit.search");
    assert!(events.as_array().is_some_and(|a| !a.is_empty()));
    for e in events.as_array().expect("events") {
        assert_eq!(e["subject"]["deployment"], "a1", "{e}");
    }
    let rep = body_of(&acme.get("/v1/doctor"), "doctor.report");
    let names: Vec<_> = rep["deployments"]
        .as_array()
        .expect("d")
        .iter()
        .map(|d| d["name"].clone())
        .collect();
    assert_eq!(names, [serde_json::json!("a1")]);
    // The unscoped admin still sees everything (the refusals above are one
    // `auth.refused` record of its own).
    let all = body_of(&s.admin().get("/v1/audit"), "audit.search");
    let actions: Vec<_> = all
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["action"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        actions.iter().filter(|a| *a != "auth.refused").count(),
        2,
        "{actions:?}"
    );
    assert_eq!(
        actions.iter().filter(|a| *a == "auth.refused").count(),
        1,
        "{actions:?}"
    );
}

#[test]
fn a_deleted_deployments_name_cannot_be_taken_by_another_tenant() {
    let s = TestServer::start();
    s.path_deployment("shared", Some("acme"));
    s.backup("shared");
    let acme = s
        .client()
        .with_token(&s.token("acme-adm", &["admin:*"], Some("acme")));
    let r = acme
        .request("DELETE", "/v1/deployments/shared", &[], None)
        .expect("delete");
    body_of(&r, "deployments.delete");
    let globex = s
        .client()
        .with_token(&s.token("globex-adm", &["admin:*"], Some("globex")));
    let body = format!(r#"{{"name":"shared","path":"{}"}}"#, s.tmp.path().display());
    error_of(
        &globex.post("/v1/deployments", &body),
        409,
        "deployment.conflict",
    );
    // Its own tenant gets the name, and its backups, back.
    body_of(&acme.post("/v1/deployments", &body), "deployments.create");
    let list = body_of(&acme.get("/v1/deployments/shared/backups"), "backups.list");
    assert_eq!(list.as_array().map(|a| a.len()), Some(1));
}

/// Past `max_connections`, a connection is answered 503 `api.busy` with
/// `Retry-After` at once (not left to queue or to exhaust descriptors), and
/// serving resumes when a connection closes.
#[test]
fn connections_over_the_cap_are_answered_busy_at_once() {
    let s = TestServer::start_with(Options {
        max_connections: 2,
        ..Default::default()
    });
    let idle: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(s.addr).expect("connect"))
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t = std::time::Instant::now();
    let r = s
        .client()
        .request("GET", "/v1/healthz", &[], None)
        .expect("an answer");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "answered at once"
    );
    let e = error_of(&r, 503, "api.busy");
    assert_eq!(r.header("retry-after"), Some("1"), "{e}");
    drop(idle);
    let start = std::time::Instant::now();
    loop {
        let r = s.client().request("GET", "/v1/healthz", &[], None);
        if r.as_ref().is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5), "{r:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let m = s.admin().get("/metrics").text();
    let refused = m
        .lines()
        .find_map(|l| l.strip_prefix("pg_hardstorage_connections_refused_total "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(refused.is_some_and(|n| n >= 1), "{m}");
}

/// Request heads are bounded (hyper's default buffered about 400 KiB per
/// unauthenticated connection): a 100 KiB header is refused with 431.
#[test]
fn an_oversized_request_head_is_refused() {
    let s = TestServer::start();
    let big = format!("Bearer phs.{}.x", "a".repeat(100 << 10));
    let r = s
        .client()
        .request(
            "GET",
            "/v1/deployments",
            &[("authorization", big.as_str())],
            None,
        )
        .expect("an answer");
    assert_eq!(r.status, 431, "{}", r.text());
    // Within the bound, the same route answers as usual.
    let r = s.admin().get("/v1/deployments");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A deployment's tenant is an RBAC scope: an empty, path-like or huge one
/// is refused on create, not stored.
#[test]
fn a_deployment_tenant_must_be_a_valid_name() {
    let s = TestServer::start();
    let long = "t".repeat(5000);
    for bad in ["", "../x", long.as_str()] {
        let body = serde_json::json!({
            "name": "d1",
            "path": s.tmp.path().display().to_string(),
            "tenant": bad,
        });
        let r = s.admin().post("/v1/deployments", &body.to_string());
        let e = error_of(&r, 400, "deployment.invalid");
        assert!(
            r.text().len() < 2000,
            "the refusal does not echo it all: {e}"
        );
    }
    let body = serde_json::json!({
        "name": "d1",
        "path": s.tmp.path().display().to_string(),
        "tenant": "acme",
    });
    body_of(
        &s.admin().post("/v1/deployments", &body.to_string()),
        "deployments.create",
    );
}

/// A URI's password never comes back: not in the create response, the
/// deployment, or the listing (a read-only token sees all three).
#[test]
fn connection_passwords_are_redacted_in_every_form() {
    let s = TestServer::start();
    let reader = s
        .client()
        .with_token(&s.token("ro", &["backup:read"], None));
    for (name, pg) in [
        (
            "uri",
            "postgresql://app:UriSecret1@127.0.0.1:1/prod?password=QuerySecret2",
        ),
        ("kv", "host=127.0.0.1 port=1 password='Kv Secret3' user=app"),
    ] {
        let body = serde_json::json!({"name": name, "pg": pg});
        let created = s.admin().post("/v1/deployments", &body.to_string());
        let shown = reader.get(&format!("/v1/deployments/{name}"));
        let listed = reader.get("/v1/deployments");
        for r in [&created, &shown, &listed] {
            assert_eq!(r.status, 200, "{}", r.text());
            for secret in ["UriSecret1", "QuerySecret2", "Secret3"] {
                assert!(!r.text().contains(secret), "{secret} leaked: {}", r.text());
            }
        }
    }
}

/// An over-long restore id (5,000 characters: the file name is too long)
/// is a plain 404, never a 500 carrying the
/// repository's host path.
#[test]
fn a_long_restore_id_is_not_found_without_host_paths() {
    let s = TestServer::start();
    s.path_deployment("d", None);
    let id = "r".repeat(5000);
    let r = s.admin().get(&format!("/v1/deployments/d/restores/{id}"));
    error_of(&r, 404, "restore.not_found");
    let repo_path = s.tmp.path().display().to_string();
    assert!(!r.text().contains(&repo_path), "{}", r.text());
}

/// Another tenant's deployment name answers a create the same whether the
/// deployment is live or deleted, and says nothing of its settings.
#[test]
fn a_create_does_not_tell_another_tenants_deployment_apart() {
    let s = TestServer::start();
    s.path_deployment("live", Some("acme"));
    s.path_deployment("gone", Some("acme"));
    let acme = s
        .client()
        .with_token(&s.token("acme-adm", &["admin:*"], Some("acme")));
    body_of(
        &acme
            .request("DELETE", "/v1/deployments/gone", &[], None)
            .expect("delete"),
        "deployments.delete",
    );
    let globex = s
        .client()
        .with_token(&s.token("globex-adm", &["admin:*"], Some("globex")));
    let answer = |name: &str| {
        let body = format!(r#"{{"name":"{name}","path":"{}"}}"#, s.tmp.path().display());
        let r = globex.post("/v1/deployments", &body);
        let e = error_of(&r, 409, "deployment.conflict");
        let m = e["message"]
            .as_str()
            .unwrap_or_default()
            .replace(name, "NAME");
        assert!(!m.contains("settings") && !m.contains("tenant"), "{m}");
        m
    };
    assert_eq!(answer("live"), answer("gone"));
    assert_eq!(globex.get("/v1/deployments/live").status, 404);
}

/// Refused requests are counted in /metrics and reach the audit log,
/// rate-limited: a burst of them is one audit record, not one each.
#[test]
fn refused_requests_are_counted_and_audited_once_a_minute() {
    let s = TestServer::start();
    let reader = s
        .client()
        .with_token(&s.token("ro", &["backup:read"], None));
    for i in 0..5 {
        let bad = s.client().with_token(&format!("phs.nobody{i}.secret"));
        assert_eq!(bad.get("/v1/deployments").status, 401);
    }
    assert_eq!(
        reader.post("/v1/kms/shred", r#"{"confirm":"x"}"#).status,
        403
    );
    let t0 = std::time::Instant::now();
    let refused = loop {
        let ev = body_of(&s.admin().get("/v1/audit"), "audit.search");
        let refused: Vec<_> = ev
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["action"] == "auth.refused")
            .cloned()
            .collect();
        if !refused.is_empty() {
            break refused;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "never audited: {ev}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(refused.len(), 1, "one record for the burst: {refused:?}");
    assert_eq!(
        refused[0]["subject"]["unauthenticated"], 1,
        "{}",
        refused[0]
    );
    let m = s.admin().get("/metrics").text();
    let count = |reason: &str| {
        m.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "pg_hardstorage_auth_refused_total{{reason=\"{reason}\"}} "
                ))
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    assert_eq!(count("unauthenticated"), Some(5), "{m}");
    assert_eq!(count("denied"), Some(1), "{m}");
}

/// Finding 7: a revoked token's old record put back (a storage rollback)
/// must not revive it.
#[test]
fn a_revoked_token_stays_revoked_when_its_old_record_is_put_back() {
    let s = TestServer::start();
    let t = s.token("ci", &["backup:read"], None);
    let c = s.client().with_token(&t);
    body_of(&c.get("/v1/deployments"), "deployments.list");
    let old = s.repo.store.get("tokens/ci").expect("get").expect("record");
    pg_hardstorage_repo::ops::tokens_revoke(&s.repo, "cli:test", "ci").expect("revoke");
    s.repo.store.put("tokens/ci", old).expect("roll back");
    // Past the token cache's TTL (2 s): the listing sees the old record
    // and leaves it out, and the name it does not know is then looked up
    // alone (the path a just-created token takes): both must refuse it.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    error_of(&c.get("/v1/deployments"), 401, "auth.token_required");
    error_of(&c.get("/v1/deployments"), 401, "auth.token_required");
}

/// The router resolves every route's scope before its handler runs (so no
/// handler can forget it): over the whole table, a tenant-bound token with
/// every verb gets for another tenant's deployment exactly the answer it
/// gets for one that does not exist — before any body is read — and every
/// repository-wide route is refused to it.
#[test]
fn every_scoped_route_hides_another_tenants_deployment_and_refuses_repository_routes() {
    use pg_hardstorage_apiserver::routes::Scope;
    let s = TestServer::start();
    s.path_deployment("b1", Some("globex"));
    let id = s.backup("b1");
    let acme = s
        .client()
        .with_token(&s.token("acme-root", &["admin:*"], Some("acme")));
    let json = [("Accept", "application/json")];
    let path_for = |route: &str, d: &str| {
        route
            .replace("{d}", d)
            .replace("{deployment}", d)
            .replace("{id}", &id.replacen("b1", d, 1))
            .replace("{seg}", "000000010000000000000001")
            .replace("{r}", "default")
    };
    let (mut scoped, mut global) = (0, 0);
    for route in ROUTES {
        match route.scope {
            Scope::Deployment(_) | Scope::Backup => {
                let theirs = acme
                    .request(route.method, &path_for(route.path, "b1"), &json, None)
                    .expect("req");
                let missing = acme
                    .request(route.method, &path_for(route.path, "nope"), &json, None)
                    .expect("req");
                let a = error_of(&theirs, 404, "deployment.not_found");
                let b = error_of(&missing, 404, "deployment.not_found");
                assert_eq!(
                    a["message"].as_str().map(|m| m.replace("b1", "nope")),
                    b["message"].as_str().map(str::to_string),
                    "{} {}",
                    route.method,
                    route.path
                );
                scoped += 1;
            }
            Scope::Repository => {
                let r = acme
                    .request(route.method, &path_for(route.path, "b1"), &json, None)
                    .expect("req");
                error_of(&r, 403, "authz.denied");
                global += 1;
            }
            Scope::Open | Scope::Tenant => {}
        }
    }
    assert!(
        scoped >= 17 && global >= 10,
        "{scoped} scoped, {global} global"
    );
}
