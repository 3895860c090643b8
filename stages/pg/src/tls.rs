//! TLS to PostgreSQL with libpq's `sslmode` semantics, over rustls.
//!
//! | mode | chain checked | host name checked |
//! |---|---|---|
//! | `allow`, `prefer`, `require` | only when a root certificate is there (`sslrootcert` or `~/.postgresql/root.crt`), as libpq | no |
//! | `verify-ca` | yes | no |
//! | `verify-full` | yes | yes |
//!
//! The handshake's signatures are always checked, so a channel-bound SCRAM
//! exchange ties the password proof to the certificate the server showed.

use crate::conninfo::{ConnInfo, RootCert, SslMode};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::path::Path;
use std::sync::Arc;

/// What the client presents and checks in one TLS handshake.
pub struct TlsPlan {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

fn invalid(m: String) -> Problem {
    Problem::new(Code::DeploymentInvalid, m)
}

/// The system trust store's bundle: `SSL_CERT_FILE`, else Debian's.
fn system_bundle() -> std::path::PathBuf {
    std::env::var_os("SSL_CERT_FILE")
        .map(Into::into)
        .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into())
}

fn read_roots(path: &Path) -> Result<RootCertStore, Problem> {
    let pem = std::fs::read(path).map_err(|e| {
        invalid(format!("the root certificate file {} cannot be read: {e}", path.display())).suggest(
            "Point sslrootcert at the CA that signed the server's certificate, or use sslmode=require to skip the check",
            None,
        )
    })?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| invalid(format!("{}: not PEM certificates: {e}", path.display())))?;
        roots.add(c).map_err(|e| {
            invalid(format!(
                "{}: a certificate is unusable: {e}",
                path.display()
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(invalid(format!("{} holds no certificate", path.display())));
    }
    Ok(roots)
}

/// The roots to check against, or `None` for a mode that checks nothing.
fn roots(ci: &ConnInfo) -> Result<Option<RootCertStore>, Problem> {
    let t = &ci.tls;
    match &t.rootcert {
        Some(RootCert::System) => read_roots(&system_bundle()).map(Some),
        Some(RootCert::File(f)) if t.mode >= SslMode::VerifyCa || f.exists() => {
            read_roots(f).map(Some)
        }
        _ if t.mode >= SslMode::VerifyCa => Err(invalid(format!(
            "sslmode={} needs a root certificate and none was given",
            if t.mode == SslMode::VerifyFull {
                "verify-full"
            } else {
                "verify-ca"
            }
        ))
        .suggest(
            "Set sslrootcert=/path/to/ca.crt (or put it at ~/.postgresql/root.crt)",
            None,
        )),
        _ => Ok(None),
    }
}

/// A client key file must not be readable by others (libpq's rule: 0600,
/// or 0640 when root owns it).
fn check_key_mode(path: &Path) -> Result<(), Problem> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::metadata(path).map_err(|e| {
        invalid(format!(
            "the client key {} cannot be read: {e}",
            path.display()
        ))
    })?;
    let mode = m.permissions().mode();
    let ok = mode & 0o077 == 0 || (m.uid() == 0 && mode & 0o037 == 0);
    match ok {
        true => Ok(()),
        false => Err(invalid(format!(
            "the client key {} has group or world access",
            path.display()
        ))
        .suggest("chmod 0600 the key file", None)),
    }
}

fn client_cert(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Problem> {
    let pem = std::fs::read(cert).map_err(|e| {
        invalid(format!(
            "the client certificate {} cannot be read: {e}",
            cert.display()
        ))
    })?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{}: not PEM certificates: {e}", cert.display())))?;
    check_key_mode(key)?;
    let k = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| invalid(format!("the client key {} is unusable: {e}", key.display())))?;
    Ok((chain, k))
}

/// The TLS configuration for `ci`.
pub fn plan(ci: &ConnInfo) -> Result<TlsPlan, Problem> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match roots(ci)? {
        Some(r) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(r), provider.clone())
                .build()
                .map_err(|e| invalid(format!("root certificates: {e}")))?;
            match ci.tls.mode {
                SslMode::VerifyFull => webpki,
                _ => Arc::new(ChainOnly(webpki)),
            }
        }
        None => Arc::new(Unverified(provider.clone())),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Problem::internal(format!("rustls: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &ci.tls.cert {
        Some((c, k)) => {
            let (chain, key) = client_cert(c, k)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid(format!("the client certificate and key do not match: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    // PostgreSQL 17 requires this ALPN on direct TLS; it is harmless otherwise.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let server_name = ServerName::try_from(ci.host.clone())
        .map_err(|_| invalid("the host is not a valid TLS server name".into()))?;
    Ok(TlsPlan {
        config: Arc::new(config),
        server_name,
    })
}

/// `verify-ca`: the chain must lead to a trusted root; the name is not
/// checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` (and `prefer`, `allow`) with no root certificate: encrypted,
/// the certificate taken as shown; the handshake signatures still checked.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The problem a failed handshake is: a certificate the client does not
/// trust (or one the server refused) is `pg.tls_failed`, exit 3.
pub fn handshake_error(e: std::io::Error) -> Problem {
    let detail = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .map(|r| r.to_string())
        .unwrap_or_else(|| e.to_string());
    Problem::new(
        Code::PgTlsFailed,
        format!("TLS handshake with PostgreSQL failed: {detail}"),
    )
    .suggest(
        "Check sslrootcert (the CA that signed the server's certificate), that the host name matches the certificate, and sslcert/sslkey",
        None,
    )
}

/// RFC 5929 `tls-server-end-point`: the server certificate hashed with its
/// signature's hash (SHA-256 for MD5, SHA-1 and SHA-256), as PostgreSQL
/// computes it.
pub fn server_end_point(cert_der: &[u8]) -> Vec<u8> {
    use aws_lc_rs::digest;
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c],
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d],
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],
    ];
    let oid = signature_oid(cert_der).unwrap_or_default();
    let alg = if SHA384.contains(&oid) {
        &digest::SHA384
    } else if SHA512.contains(&oid) {
        &digest::SHA512
    } else {
        &digest::SHA256
    };
    digest::digest(alg, cert_der).as_ref().to_vec()
}

/// One DER element at the front of `b`: (tag, contents, rest).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&l, b) = b.split_first()?;
    let (len, b) = match l {
        0..=0x7f => (l as usize, b),
        0x81..=0x84 => {
            let n = (l & 0x7f) as usize;
            let bytes = b.get(..n)?;
            (
                bytes.iter().fold(0usize, |a, &x| a << 8 | x as usize),
                &b[n..],
            )
        }
        _ => return None,
    };
    Some((tag, b.get(..len)?, b.get(len..)?))
}

/// The signature algorithm OID of a certificate (`Certificate ::=
/// SEQUENCE { tbsCertificate, signatureAlgorithm, signature }`).
fn signature_oid(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, body, _) = der(cert)? else {
        return None;
    };
    let (0x30, _, rest) = der(body)? else {
        return None;
    };
    let (0x30, alg, _) = der(rest)? else {
        return None;
    };
    match der(alg)? {
        (0x06, oid, _) => Some(oid),
        _ => None,
    }
}
