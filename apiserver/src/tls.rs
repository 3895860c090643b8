//! TLS with rustls (aws-lc-rs): server certificate and key from PEM files,
//! and with a client CA, mutual TLS: a client certificate is optional, but
//! one that is presented must chain to the CA or the handshake fails.

use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

fn bad(what: &str, p: &Path, e: impl std::fmt::Display) -> Problem {
    Problem::new(
        Code::UsageInvalidArgument,
        format!("{what} {}: {e}", p.display()),
    )
    .suggest(
        "Pass PEM files: --tls-cert, --tls-key and optionally --client-ca",
        None,
    )
}

fn certs(p: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, Problem> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(p)
        .map_err(|e| bad(what, p, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(what, p, e))?;
    if certs.is_empty() {
        return Err(bad(what, p, "no certificate in it"));
    }
    Ok(certs)
}

pub fn server_config(f: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, Problem> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = certs(&f.cert, "--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(&f.key).map_err(|e| bad("--tls-key", &f.key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Problem::internal(format!("tls: {e}")))?;
    let builder = match &f.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca, "--client-ca")? {
                roots.add(c).map_err(|e| bad("--client-ca", ca, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| bad("--client-ca", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| bad("--tls-cert/--tls-key", &f.cert, e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The Subject CN of a (verified) client certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
