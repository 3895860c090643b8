//! The one error-code table.
//!
//! Every failure that leaves the library carries a stable dotted code
//! (`verify.checksum_mismatch`, `repo.locked`, ...). The code decides the
//! class, and the class decides both the HTTP status and the CLI exit code of
//! the contract (`shared/spec/api-reference.md`). Nothing else maps errors.

use serde::Serialize;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;

/// The contract's error classes: one HTTP status and one CLI exit code each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Misuse,
    AuthRequired,
    AuthDenied,
    NotFound,
    Conflict,
    Preflight,
    Verify,
    Unavailable,
    /// The route exists, not with that method (HTTP 405; exit 2 as misuse).
    MethodNotAllowed,
    Unimplemented,
    Internal,
}

impl Class {
    pub fn http_status(self) -> u16 {
        match self {
            Class::Misuse => 400,
            Class::AuthRequired => 401,
            Class::AuthDenied => 403,
            Class::NotFound => 404,
            Class::Conflict => 409,
            Class::Preflight => 412,
            Class::Verify => 422,
            Class::Unavailable => 503,
            Class::MethodNotAllowed => 405,
            Class::Unimplemented => 501,
            Class::Internal => 500,
        }
    }

    pub fn exit_code(self) -> i32 {
        match self {
            Class::Misuse | Class::MethodNotAllowed => 2,
            Class::AuthRequired | Class::AuthDenied => 3,
            Class::Preflight => 4,
            Class::NotFound => 6,
            Class::Conflict => 7,
            Class::Unavailable => 8,
            Class::Verify => 9,
            Class::Unimplemented | Class::Internal => 1,
        }
    }
}

/// Every code the library emits: `(code, class, retryable)`.
/// Documented in `docs/specs/errors.md`; a test keeps the two in step.
pub const CODES: &[(&str, Class, bool)] = &[
    ("usage.invalid_argument", Class::Misuse, false),
    ("usage.invalid_time", Class::Misuse, false),
    ("auth.key_required", Class::AuthRequired, false),
    ("auth.bad_key", Class::AuthDenied, false),
    ("authz.denied", Class::AuthDenied, false),
    ("auth.token_required", Class::AuthRequired, false),
    ("token.not_found", Class::NotFound, false),
    ("token.conflict", Class::Conflict, false),
    ("api.route_not_found", Class::NotFound, false),
    ("api.method_not_allowed", Class::MethodNotAllowed, false),
    ("api.bad_request", Class::Misuse, false),
    ("api.body_too_large", Class::Misuse, false),
    ("api.busy", Class::Unavailable, true),
    ("restore.not_found", Class::NotFound, false),
    ("doctor.unhealthy", Class::Preflight, false),
    ("repo.not_found", Class::NotFound, false),
    ("repo.already_exists", Class::Conflict, false),
    ("repo.locked", Class::Conflict, true),
    ("repo.format_unsupported", Class::Misuse, false),
    ("repo.config_invalid", Class::Verify, false),
    ("deployment.not_found", Class::NotFound, false),
    ("deployment.conflict", Class::Conflict, false),
    ("deployment.invalid", Class::Misuse, false),
    ("backup.not_found", Class::NotFound, false),
    ("backup.deleted", Class::NotFound, false),
    ("backup.held", Class::Conflict, false),
    ("hold.not_found", Class::NotFound, false),
    ("backup.source_unreadable", Class::Preflight, false),
    ("wal.segment_not_found", Class::NotFound, false),
    ("restore.target_not_empty", Class::Preflight, false),
    ("restore.target_invalid", Class::Preflight, false),
    ("restore.postmaster_running", Class::Preflight, false),
    ("restore.target_outside_archive", Class::Preflight, false),
    ("restore.foreign_system", Class::Preflight, false),
    ("restore.wal_missing", Class::Preflight, false),
    ("verify.checksum_mismatch", Class::Verify, false),
    ("verify.decrypt_failed", Class::Verify, false),
    ("verify.malformed", Class::Verify, false),
    ("verify.truncated", Class::Verify, false),
    ("verify.missing_object", Class::Verify, false),
    ("verify.signature_invalid", Class::Verify, false),
    ("verify.pg_verifybackup_failed", Class::Verify, false),
    ("verify.audit_chain_broken", Class::Verify, false),
    ("verify.repository_damaged", Class::Verify, false),
    ("verify.scrub_failed", Class::Verify, false),
    ("restore.verify_unavailable", Class::Internal, false),
    ("pg.unreachable", Class::Unavailable, true),
    ("pg.auth_failed", Class::AuthDenied, false),
    ("pg.auth_method_refused", Class::AuthDenied, false),
    ("pg.tls_failed", Class::AuthDenied, false),
    ("pg.tls_unavailable", Class::Preflight, false),
    ("pg.replication_denied", Class::Preflight, false),
    ("pg.system_mismatch", Class::Preflight, false),
    ("pg.server_error", Class::Internal, false),
    ("pg.protocol", Class::Internal, false),
    ("storage.unreachable", Class::Unavailable, true),
    ("kms.unavailable", Class::Unavailable, true),
    ("kms.key_destroyed", Class::AuthDenied, false),
    ("storage.io", Class::Internal, true),
    ("storage.auth", Class::AuthDenied, false),
    ("io.read_failed", Class::Internal, false),
    ("io.write_failed", Class::Internal, false),
    ("pipeline.aborted", Class::Internal, false),
    ("unimplemented", Class::Unimplemented, false),
    ("internal", Class::Internal, false),
];

/// Looks a code up in [`CODES`]. Unknown codes are internal errors.
pub fn lookup(code: &str) -> (Class, bool) {
    CODES
        .iter()
        .find(|(c, _, _)| *c == code)
        .map(|(_, class, retry)| (*class, *retry))
        .unwrap_or((Class::Internal, false))
}

/// What to do about an error: the contract's `suggestion` object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Suggestion {
    pub human: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub doc_url: String,
}

/// A coded error: what the CLI prints and the API returns. Boxed so that
/// `Result<T, Problem>` stays one pointer wide on the happy path.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem(Box<ProblemInner>);

#[derive(Clone, Debug, PartialEq)]
pub struct ProblemInner {
    pub code: Cow<'static, str>,
    pub message: String,
    pub subject: Map<String, Value>,
    pub suggestion: Option<Suggestion>,
}

impl std::ops::Deref for Problem {
    type Target = ProblemInner;
    fn deref(&self) -> &ProblemInner {
        &self.0
    }
}

impl std::ops::DerefMut for Problem {
    fn deref_mut(&mut self) -> &mut ProblemInner {
        &mut self.0
    }
}

impl Problem {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        debug_assert!(
            CODES.iter().any(|(c, _, _)| *c == code),
            "error code {code} missing from CODES"
        );
        Problem(Box::new(ProblemInner {
            code: Cow::Borrowed(code),
            message: message.into(),
            subject: Map::new(),
            suggestion: None,
        }))
    }

    pub fn class(&self) -> Class {
        lookup(&self.code).0
    }

    pub fn retryable(&self) -> bool {
        lookup(&self.code).1
    }

    pub fn exit_code(&self) -> i32 {
        self.class().exit_code()
    }

    pub fn http_status(&self) -> u16 {
        self.class().http_status()
    }

    /// Adds one `subject` field (`deployment`, `backup_id`, `pack`, ...).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.subject.insert(key.to_string(), value.into());
        self
    }

    pub fn suggest(mut self, human: impl Into<String>, command: Option<String>) -> Self {
        let slug = self.code.replace(['.', '_'], "-");
        self.suggestion = Some(Suggestion {
            human: human.into(),
            command,
            doc_url: format!("https://docs.pghardstorage.org/runbooks/{slug}"),
        });
        self
    }

    /// Prefixes the message with context, keeping the code.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Problem::new("internal", message)
    }

    pub fn io(code: &'static str, what: impl fmt::Display, err: &std::io::Error) -> Self {
        Problem::new(code, format!("{what}: {err}"))
    }

    /// The contract's `error` object.
    pub fn to_json(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), Value::String(self.code.to_string()));
        error.insert("message".into(), Value::String(self.message.clone()));
        error.insert("subject".into(), Value::Object(self.subject.clone()));
        // Whether the same request may succeed when repeated unchanged (the
        // code's entry in the one table): what a scripted caller retries.
        error.insert("retryable".into(), Value::Bool(self.retryable()));
        // Every error carries a suggestion (the contract's shape): the
        // specific one when the code path gave one, else the class's advice
        // and the code's runbook.
        let s = self.suggestion.clone().unwrap_or_else(|| {
            let human = match self.class() {
                Class::Misuse => "Check the arguments or request body against the documentation",
                Class::AuthRequired => "Supply credentials",
                Class::AuthDenied => "Use credentials that are granted this operation",
                Class::NotFound => "Check the name or id; list what exists first",
                Class::Conflict => {
                    "Resolve the conflict (another writer, or different settings) and retry"
                }
                Class::Preflight => "Fix the precondition named in the message, then retry",
                Class::Unavailable => "Check that the storage or service is reachable, then retry",
                Class::Verify => {
                    "Run `pg_hardstorage backup verify` and check the repository's storage"
                }
                Class::MethodNotAllowed => "Use a method the route takes (see the Allow header)",
                Class::Unimplemented => "This capability is not built yet",
                Class::Internal => "Retry; if it persists, report it with the message",
            };
            Suggestion {
                human: human.into(),
                command: None,
                doc_url: format!(
                    "https://docs.pghardstorage.org/runbooks/{}",
                    self.code.replace(['.', '_'], "-")
                ),
            }
        });
        error.insert(
            "suggestion".into(),
            serde_json::to_value(s).unwrap_or(Value::Null),
        );
        Value::Object(error)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Problem {}

pub type Result<T, E = Problem> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_json_says_whether_to_retry() {
        let j = |code: &'static str| Problem::new(code, "m").to_json();
        assert_eq!(j("storage.unreachable")["retryable"], true);
        assert_eq!(j("repo.locked")["retryable"], true);
        assert_eq!(j("verify.checksum_mismatch")["retryable"], false);
        assert_eq!(j("usage.invalid_argument")["retryable"], false);
    }

    #[test]
    fn contract_table_maps_status_and_exit() {
        let cases = [
            ("usage.invalid_argument", 400, 2),
            ("auth.key_required", 401, 3),
            ("authz.denied", 403, 3),
            ("backup.not_found", 404, 6),
            ("repo.locked", 409, 7),
            ("restore.target_not_empty", 412, 4),
            ("verify.checksum_mismatch", 422, 9),
            ("storage.unreachable", 503, 8),
            ("internal", 500, 1),
        ];
        for (code, http, exit) in cases {
            let (class, _) = lookup(code);
            assert_eq!(class.http_status(), http, "{code}");
            assert_eq!(class.exit_code(), exit, "{code}");
        }
    }

    /// docs/specs/errors.md documents every code with its HTTP status and
    /// exit code; the two must not drift apart.
    #[test]
    fn errors_spec_matches_the_table() {
        let doc = include_str!("../../docs/specs/errors.md");
        for (code, class, retry) in CODES {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{code}` |")))
                .unwrap_or_else(|| panic!("{code} is missing from docs/specs/errors.md"));
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            assert_eq!(cells[3], class.http_status().to_string(), "{code}");
            assert_eq!(cells[4], class.exit_code().to_string(), "{code}");
            assert_eq!(cells[5], if *retry { "yes" } else { "no" }, "{code}");
        }
        let documented = doc.lines().filter(|l| l.starts_with("| `")).count();
        assert_eq!(documented, CODES.len(), "docs list codes the table lacks");
    }

    #[test]
    fn codes_are_unique_and_dotted() {
        let mut seen = std::collections::HashSet::new();
        for (code, _, _) in CODES {
            assert!(seen.insert(*code), "duplicate {code}");
            assert!(
                code.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_'),
                "{code}"
            );
        }
    }
}
