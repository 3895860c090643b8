//! The one error-code table.
//!
//! Every failure that leaves the library carries a stable dotted code
//! (`verify.checksum_mismatch`, `repo.locked`, ...). The code decides the
//! class, and the class decides both the HTTP status and the CLI exit code of
//! the contract (`shared/spec/api-reference.md`). Nothing else maps errors.

use serde::Serialize;
use serde_json::{Map, Value};
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

/// Declares [`Code`] and [`CODES`] from one list, so a code exists exactly
/// when it is in the table: a misspelt code is a compile error.
macro_rules! codes {
    ($($variant:ident = $code:literal, $class:ident, $retry:literal;)*) => {
        /// Every code the library emits. Documented in `docs/specs/errors.md`;
        /// a test keeps the two in step. A code outside the table does not
        /// compile, as a string or as a variant:
        ///
        /// ```compile_fail
        /// let _ = pg_hardstorage_engine::Problem::new("verify.checksum_mismatch", "x");
        /// ```
        ///
        /// ```compile_fail
        /// let _ = pg_hardstorage_engine::Code::VerifyChecksumMismach;
        /// ```
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Code {
            $($variant,)*
        }

        impl Code {
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The stable dotted form (`verify.checksum_mismatch`).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $code,)*
                }
            }

            pub const fn class(self) -> Class {
                match self {
                    $(Code::$variant => Class::$class,)*
                }
            }

            /// Whether the same request may succeed when repeated unchanged.
            pub const fn retryable(self) -> bool {
                match self {
                    $(Code::$variant => $retry,)*
                }
            }
        }

        /// Every code with its class and whether it is retryable.
        pub const CODES: &[(&str, Class, bool)] = &[$(($code, Class::$class, $retry),)*];
    };
}

codes! {
    UsageInvalidArgument = "usage.invalid_argument", Misuse, false;
    UsageInvalidTime = "usage.invalid_time", Misuse, false;
    AuthKeyRequired = "auth.key_required", AuthRequired, false;
    AuthBadKey = "auth.bad_key", AuthDenied, false;
    AuthzDenied = "authz.denied", AuthDenied, false;
    AuthTokenRequired = "auth.token_required", AuthRequired, false;
    TokenNotFound = "token.not_found", NotFound, false;
    TokenConflict = "token.conflict", Conflict, false;
    ApiRouteNotFound = "api.route_not_found", NotFound, false;
    ApiMethodNotAllowed = "api.method_not_allowed", MethodNotAllowed, false;
    ApiBadRequest = "api.bad_request", Misuse, false;
    ApiBodyTooLarge = "api.body_too_large", Misuse, false;
    ApiBusy = "api.busy", Unavailable, true;
    RestoreNotFound = "restore.not_found", NotFound, false;
    DoctorUnhealthy = "doctor.unhealthy", Preflight, false;
    RepoNotFound = "repo.not_found", NotFound, false;
    RepoAlreadyExists = "repo.already_exists", Conflict, false;
    RepoLocked = "repo.locked", Conflict, true;
    RepoFormatUnsupported = "repo.format_unsupported", Misuse, false;
    RepoConfigInvalid = "repo.config_invalid", Verify, false;
    DeploymentNotFound = "deployment.not_found", NotFound, false;
    DeploymentConflict = "deployment.conflict", Conflict, false;
    DeploymentInvalid = "deployment.invalid", Misuse, false;
    BackupNotFound = "backup.not_found", NotFound, false;
    BackupDeleted = "backup.deleted", NotFound, false;
    BackupHeld = "backup.held", Conflict, false;
    HoldNotFound = "hold.not_found", NotFound, false;
    BackupSourceUnreadable = "backup.source_unreadable", Preflight, false;
    BackupIncrementalMismatch = "backup.incremental_mismatch", Verify, false;
    WalSegmentNotFound = "wal.segment_not_found", NotFound, false;
    RestoreTargetNotEmpty = "restore.target_not_empty", Preflight, false;
    RestoreTargetInvalid = "restore.target_invalid", Preflight, false;
    RestorePostmasterRunning = "restore.postmaster_running", Preflight, false;
    RestoreTargetOutsideArchive = "restore.target_outside_archive", Preflight, false;
    RestoreForeignSystem = "restore.foreign_system", Preflight, false;
    RestoreWalMissing = "restore.wal_missing", Preflight, false;
    VerifyChecksumMismatch = "verify.checksum_mismatch", Verify, false;
    VerifyDecryptFailed = "verify.decrypt_failed", Verify, false;
    VerifyMalformed = "verify.malformed", Verify, false;
    VerifyTruncated = "verify.truncated", Verify, false;
    VerifyMissingObject = "verify.missing_object", Verify, false;
    VerifySignatureInvalid = "verify.signature_invalid", Verify, false;
    VerifyPgVerifybackupFailed = "verify.pg_verifybackup_failed", Verify, false;
    VerifyAuditChainBroken = "verify.audit_chain_broken", Verify, false;
    VerifyRepositoryDamaged = "verify.repository_damaged", Verify, false;
    VerifyScrubFailed = "verify.scrub_failed", Verify, false;
    RestoreVerifyUnavailable = "restore.verify_unavailable", Internal, false;
    PgUnreachable = "pg.unreachable", Unavailable, true;
    PgAuthFailed = "pg.auth_failed", AuthDenied, false;
    PgAuthMethodRefused = "pg.auth_method_refused", AuthDenied, false;
    PgTlsFailed = "pg.tls_failed", AuthDenied, false;
    PgTlsUnavailable = "pg.tls_unavailable", Preflight, false;
    PgReplicationDenied = "pg.replication_denied", Preflight, false;
    PgSystemMismatch = "pg.system_mismatch", Preflight, false;
    PgWalSegmentSizeUnsupported = "pg.wal_segment_size_unsupported", Preflight, false;
    PgServerError = "pg.server_error", Internal, false;
    PgProtocol = "pg.protocol", Internal, false;
    StorageUnreachable = "storage.unreachable", Unavailable, true;
    KmsUnavailable = "kms.unavailable", Unavailable, true;
    KmsKeyDestroyed = "kms.key_destroyed", AuthDenied, false;
    StorageIo = "storage.io", Internal, true;
    StorageAuth = "storage.auth", AuthDenied, false;
    IoReadFailed = "io.read_failed", Internal, false;
    IoWriteFailed = "io.write_failed", Internal, false;
    PipelineAborted = "pipeline.aborted", Internal, false;
    Unimplemented = "unimplemented", Unimplemented, false;
    Internal = "internal", Internal, false;
}

/// Looks a dotted code up in the table. Unknown codes are internal errors.
pub fn lookup(code: &str) -> (Class, bool) {
    Code::parse(code).map_or((Class::Internal, false), |c| (c.class(), c.retryable()))
}

impl Code {
    /// The code of a dotted string, if it is one.
    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.iter().copied().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::ops::Deref for Code {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Code {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for Code {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
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

#[derive(Clone, Debug)]
pub struct ProblemInner {
    pub code: Code,
    pub message: String,
    pub subject: Map<String, Value>,
    pub suggestion: Option<Suggestion>,
    /// The error this one was made from (an I/O or store error), for
    /// `std::error::Error::source`; not part of the contract's JSON.
    pub source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
}

/// Two problems are equal when what they say is (the source is not compared).
impl PartialEq for ProblemInner {
    fn eq(&self, o: &Self) -> bool {
        (self.code, &self.message, &self.subject, &self.suggestion)
            == (o.code, &o.message, &o.subject, &o.suggestion)
    }
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
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Problem(Box::new(ProblemInner {
            code,
            message: message.into(),
            subject: Map::new(),
            suggestion: None,
            source: None,
        }))
    }

    /// Keeps the error this problem was made from.
    pub fn caused_by(mut self, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(std::sync::Arc::new(e));
        self
    }

    pub fn class(&self) -> Class {
        self.code.class()
    }

    pub fn retryable(&self) -> bool {
        self.code.retryable()
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
        Problem::new(Code::Internal, message)
    }

    /// An I/O failure, with a copy of the `io::Error` as its source.
    pub fn io(code: Code, what: impl fmt::Display, err: &std::io::Error) -> Self {
        Problem::new(code, format!("{what}: {err}"))
            .caused_by(std::io::Error::new(err.kind(), err.to_string()))
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

impl std::error::Error for Problem {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

pub type Result<T, E = Problem> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_json_says_whether_to_retry() {
        let j = |code: Code| Problem::new(code, "m").to_json();
        assert_eq!(j(Code::StorageUnreachable)["retryable"], true);
        assert_eq!(j(Code::RepoLocked)["retryable"], true);
        assert_eq!(j(Code::VerifyChecksumMismatch)["retryable"], false);
        assert_eq!(j(Code::UsageInvalidArgument)["retryable"], false);
        assert_eq!(j(Code::StorageAuth)["code"], "storage.auth");
    }

    #[test]
    fn a_problem_keeps_the_error_it_was_made_from() {
        use std::error::Error as _;
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "no");
        let p = Problem::io(Code::IoReadFailed, "read x", &io);
        let src = p.source().expect("source kept");
        assert_eq!(src.to_string(), "no");
        assert_eq!(p.to_json()["code"], "io.read_failed");
        assert!(Problem::new(Code::Internal, "m").source().is_none());
        // Every code parses back from its dotted form.
        for c in Code::ALL {
            assert_eq!(Code::parse(c.as_str()), Some(*c));
        }
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
