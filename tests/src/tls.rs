//! A throwaway certificate authority for TLS tests (the fake Beamlit's server
//! certificate, and an unrelated CA for "client trusts the wrong CA" cases).
//!
//! Every [`TestCa`] has a freshly generated key, so two of them never trust each
//! other's certificates.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A CA whose certificate is written to `<dir>/<name>.pem` (`ca.pem` for
/// [`TestCa::new`]). The CA key stays in memory only: nothing but this value can
/// issue certificates under it.
pub struct TestCa {
    name: String,
    dir: PathBuf,
    ca_pem_path: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
    issued: AtomicU32,
}

impl std::fmt::Debug for TestCa {
    // rcgen's issuer Debug elides the key already; the paths are what matters.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .field("ca_pem_path", &self.ca_pem_path)
            .finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new CA in `dir` (which must exist), certificate in `dir/ca.pem`.
    pub fn new(dir: &Path) -> Result<Self> {
        Self::with_name(dir, "ca")
    }

    /// A new CA whose certificate is `dir/<name>.pem` and whose issued files are
    /// prefixed `<name>-`, so several unrelated CAs can share one directory:
    /// `TestCa::with_name(dir, "other-ca")` is the "wrong CA" of TLS failure tests.
    pub fn with_name(dir: &Path, name: &str) -> Result<Self> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("TestCa name {name:?} must be non-empty [A-Za-z0-9-]");
        }
        let key = KeyPair::generate().context("generating the test CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("beamlit-testbed {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer =
            CertifiedIssuer::self_signed(params, key).context("self-signing the test CA")?;
        let ca_pem_path = dir.join(format!("{name}.pem"));
        write_file(&ca_pem_path, &issuer.pem(), false)?;
        Ok(Self {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            ca_pem_path,
            issuer,
            issued: AtomicU32::new(0),
        })
    }

    /// The CA certificate (PEM), what clients pass as `--cacert` / trust anchor.
    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_pem_path
    }

    /// The CA certificate as PEM text.
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a server certificate (ServerAuth, SANs = `names` + `ips`, CN = the
    /// first name) and writes it and its key next to the CA certificate. Returns
    /// `(certificate chain PEM, private key PEM)`; the chain holds only the leaf
    /// (clients must trust the CA itself, as with a private PKI).
    pub fn issue_server_cert(&self, names: &[&str], ips: &[IpAddr]) -> Result<(PathBuf, PathBuf)> {
        if names.is_empty() && ips.is_empty() {
            bail!("a server certificate needs at least one DNS name or IP address");
        }
        let key = KeyPair::generate().context("generating a server key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(names.first().copied().unwrap_or("fake-beamlit"));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        for name in names {
            let dns = (*name)
                .try_into()
                .with_context(|| format!("{name:?} is not a valid DNS name for a certificate"))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing the server certificate")?;

        let n = self.issued.fetch_add(1, Ordering::Relaxed) + 1;
        let cert_path = self.dir.join(format!("{}-server-{n}.pem", self.name));
        let key_path = self.dir.join(format!("{}-server-{n}-key.pem", self.name));
        write_file(&cert_path, &cert.pem(), false)?;
        write_file(&key_path, &key.serialize_pem(), true)?;
        Ok((cert_path, key_path))
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "beamlit-testbed");
    dn.push(DnType::CommonName, cn);
    dn
}

/// Keys are written 0600 from the start (not chmod-ed afterwards) so they are
/// never readable by others, even briefly.
fn write_file(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestDir;

    #[test]
    fn writes_ca_and_server_files() -> Result<()> {
        let dir = TestDir::new("tlsca")?;
        let ca = TestCa::new(dir.path())?;
        let other = TestCa::with_name(dir.path(), "other-ca")?;
        assert_eq!(ca.ca_pem_path(), dir.join("ca.pem"));
        assert_ne!(ca.ca_pem(), other.ca_pem());
        let (cert, key) = ca.issue_server_cert(&["beamlit.test"], &["10.0.0.1".parse()?])?;
        assert!(std::fs::read_to_string(&cert)?.contains("BEGIN CERTIFICATE"));
        assert!(std::fs::read_to_string(&key)?.contains("PRIVATE KEY"));
        let (cert2, _) = ca.issue_server_cert(&[], &["::1".parse()?])?;
        assert_ne!(cert, cert2);
        assert!(ca.issue_server_cert(&[], &[]).is_err());
        assert!(TestCa::with_name(dir.path(), "../x").is_err());
        Ok(())
    }
}
